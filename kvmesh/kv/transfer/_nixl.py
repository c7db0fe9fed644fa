"""Everything that touches NIXL's Python API directly, typed `Any` at this boundary.

NIXL is imported on first use, from whichever build is installed, so `kvmesh.kv` loads without it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog

from kvmesh.kv.errors import TransferError

log = structlog.get_logger(__name__)

# The CUDA 13 build, the CUDA 12 build, then the meta package: the same API under three names.
_MODULES = ("nixl_cu13._api", "nixl_cu12._api", "nixl._api")
LOCAL_AGENT = "NIXL_INIT_AGENT"  # NIXL's name for "the initiator's own descriptors"


@functools.cache
def nixl_api() -> types.ModuleType:
    """NIXL's Python API, imported on first use so `kvmesh.kv` loads without it."""
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError):
            continue
        _logs_to_stderr()
        return module
    raise TransferError(f"NIXL is not installed (tried {', '.join(_MODULES)})")


def new_agent(name: str, backends: Sequence[str], progress_thread: bool, *, vram: bool) -> Any:
    """A NIXL agent with every backend asked for, or `TransferError`; no listener thread."""
    if vram:
        # Without NVLink, UCX turns off cuda_ipc GETs, and a VRAM READ (our only operation)
        # falls back to bouncing through TCP at well under 1 GB/s. UCX reads this when the agent
        # creates its context, so it is set before; an operator's own setting wins. (Only for
        # VRAM: a UCX without CUDA support warns about it on stdout.)
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    api = nixl_api()
    config = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=list(backends))
    try:
        agent = api.nixl_agent(name, config)
    except Exception as e:
        raise TransferError(f"cannot create NIXL agent {name!r}: {e}") from e
    missing = [backend for backend in backends if backend not in agent.backends]
    if missing:
        raise TransferError(f"NIXL backends {missing} are not available here")
    return agent


def _logs_to_stderr() -> None:
    """NIXL's logger writes to stdout, which our commands keep for their output."""
    for handler in logging.getLogger("nixl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def memory_of(device_index: int) -> tuple[str, int]:
    """(NIXL memory type, device id) of a tensor from its `get_device()` (-1 on the CPU)."""
    return ("DRAM", 0) if device_index < 0 else ("VRAM", device_index)


def block_descriptors(
    base_address: int, bytes_per_block: int, num_blocks: int, device_id: int
) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """NIXL's Nx3 (address, length, device) rows, one per block."""
    rows = np.empty((num_blocks, 3), dtype=np.uint64)
    rows[:, 0] = base_address + np.arange(num_blocks, dtype=np.uint64) * np.uint64(bytes_per_block)
    rows[:, 1] = bytes_per_block
    rows[:, 2] = device_id
    return rows


def as_name(name: str | bytes) -> str:
    """NIXL returns agent names as bytes or str depending on the call and version."""
    return name.decode() if isinstance(name, bytes) else str(name)


def is_disconnect(error: BaseException | None) -> bool:
    """Each NIXL build defines its own error classes, without a common base: match by name."""
    return type(error).__name__ == "nixlRemoteDisconnectError"


def forget_remote(agent: Any, name: str) -> None:
    try:
        agent.remove_remote_agent(name)
    except Exception as e:
        log.debug("kv_remote_agent_not_removed", peer=name, error=str(e))
