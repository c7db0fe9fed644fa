"""The KV layout contract: whether a decode worker can read the KV blocks a prefill worker wrote.

A worker states its layout as a fingerprint (`WorkerInfo.layout_fingerprint`, the discovery
meta `layout`, and in every `KvHandle`); the torch engine's (`kvmesh.kv.cache.KvLayout`) reads

    kvmesh-kv/v1:LT2HD:L30:H3:D64:B16:f32
    format       order layers KV-heads head-dim block-size dtype

where the order `LT2HD` says a block is `[layers, tokens, (K, V), KV heads, head dim]`, one
contiguous region. The attention backend is not part of the layout: `sdpa` and `paged` (and the
GPU kernels) write the same cache, so workers on different backends share KV. Besides the
fingerprint, a worker declares its engine's transfer mode (discovery meta `transfer_mode`):
`mesh` (kvmesh's NIXL agent copies blocks) or `engine` (the engine moves its own KV).

The dtype is `f32`, `bf16`, `f16` or `e4m3` (FP8 with per-block scales, `kvmesh.kv.quant`).

The rule: decode reads prefill's KV when every field is equal or converts, and the transfer
modes are equal where both are known. Decode converts on import (`kvmesh.kv.convert`) any
block size into its own and any of the four dtypes into its own; the order, layers, KV heads
and head dim must be equal (another model's KV means nothing here). Fingerprints of another
format (the sim engine's `kvmesh-sim/v1:...`, a plug-in's) are opaque: compatible only with an
equal fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CONVERTIBLE_DTYPES", "KV_FORMAT", "LayoutSpec", "compatible", "parse"]

KV_FORMAT = "kvmesh-kv/v1"  # the torch engine's paged cache; the only format parsed into fields


@dataclass(frozen=True, slots=True)
class LayoutSpec:
    """A fingerprint read into its fields; those of an opaque format stay None."""

    fingerprint: str
    format: str
    order: str | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    block_size: int | None = None
    dtype: str | None = None
    transfer_mode: str | None = None  # None: not known (a KvHandle does not carry it)

    @property
    def is_opaque(self) -> bool:
        """Not a well-formed `kvmesh-kv/v1` fingerprint: comparable only as a whole."""
        return self.block_size is None


def parse(fingerprint: str, *, transfer_mode: str | None = None) -> LayoutSpec:
    """Read a fingerprint; a malformed or foreign one comes back opaque, never raises."""
    mode = transfer_mode or None
    fmt, _, _ = fingerprint.partition(":")
    parts = fingerprint.split(":")
    opaque = LayoutSpec(fingerprint, fmt, transfer_mode=mode)
    if fmt != KV_FORMAT or len(parts) != 7:
        return opaque
    _, order, *sizes, dtype = parts
    numbers = []
    for part, prefix in zip(sizes, "LHDB", strict=True):
        value = part.removeprefix(prefix)
        if not part.startswith(prefix) or not value.isdigit():
            return opaque
        numbers.append(int(value))
    layers, heads, head_dim, block_size = numbers
    return LayoutSpec(fingerprint, fmt, order, layers, heads, head_dim, block_size, dtype, mode)


CONVERTIBLE_DTYPES = ("f32", "bf16", "f16", "e4m3")


def _never(prefill_value: object, decode_value: object) -> bool:
    return False


def _any_block_size(prefill_value: object, decode_value: object) -> bool:
    return True


def _known_dtypes(prefill_value: object, decode_value: object) -> bool:
    return prefill_value in CONVERTIBLE_DTYPES and decode_value in CONVERTIBLE_DTYPES


@dataclass(frozen=True, slots=True)
class _Field:
    name: str  # a LayoutSpec attribute
    label: str  # how a message names it
    converts: Callable[[object, object], bool] = _never  # can decode read prefill's value?


# In the order a message lists differences.
_FIELDS = (
    _Field("order", "order"),
    _Field("num_layers", "layers"),
    _Field("num_kv_heads", "KV heads"),
    _Field("head_dim", "head dim"),
    _Field("block_size", "block size", _any_block_size),
    _Field("dtype", "dtype", _known_dtypes),
)


def compatible(prefill: LayoutSpec | str, decode: LayoutSpec | str) -> str | None:
    """None when a decode worker of layout `decode` can read KV written in layout `prefill`
    (as it is, or converted on import); otherwise each difference it cannot convert, prefill's
    value first: "layers 30 vs 32; KV heads 3 vs 8"."""
    p = parse(prefill) if isinstance(prefill, str) else prefill
    d = parse(decode) if isinstance(decode, str) else decode
    differences = []
    if p.format != d.format:
        differences.append(f"format {p.format or '(none)'} vs {d.format or '(none)'}")
    elif p.is_opaque or d.is_opaque:
        if p.fingerprint != d.fingerprint:
            differences.append(f"layout {p.fingerprint} vs {d.fingerprint}")
    else:
        for field in _FIELDS:
            ours, theirs = getattr(p, field.name), getattr(d, field.name)
            if ours != theirs and not field.converts(ours, theirs):
                differences.append(f"{field.label} {ours} vs {theirs}")
    if p.transfer_mode and d.transfer_mode and p.transfer_mode != d.transfer_mode:
        differences.append(f"transfer mode {p.transfer_mode} vs {d.transfer_mode}")
    return "; ".join(differences) or None
