"""What crosses the transfer agent's boundary: a peer's region, a READ's result, counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KvRegion:
    """What a peer needs to READ our blocks; maps 1:1 to `GetAgentMetadataResponse`.

    Block `i` occupies `[base_address + i * bytes_per_block, +bytes_per_block)` on `device_id`.
    """

    agent_name: str
    metadata: bytes  # NIXL agent metadata: pickle inside, so from authenticated peers only
    layout_fingerprint: str
    block_size: int
    base_address: int
    bytes_per_block: int
    num_blocks: int
    device_id: int  # GPU index for VRAM, 0 for DRAM
    memory_type: str  # "DRAM" | "VRAM"


@dataclass(frozen=True, slots=True)
class TransferResult:
    num_blocks: int
    num_bytes: int
    seconds: float  # from building the request to seeing it complete


@dataclass(slots=True)
class TransferStats:
    """Monotonic counters of completed READs (and of failed ones) since the agent started."""

    transfers: int = 0
    blocks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    failures: int = 0
