"""Small host-to-device copies that do not wait for the device.

`torch.tensor(values).to("cuda")` copies from pageable memory, which makes PyTorch wait for
everything queued on the stream: harmless when the device is idle, a stall when the next step
is being prepared while the previous one runs (async scheduling). Staged in pinned memory,
the copy is queued behind the running work instead, and PyTorch's pinned allocator keeps the
staging buffer until the copy has happened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(
    values: Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`values` as a tensor on `device`; on CUDA, copied without waiting for queued work."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def upload_into(dst: torch.Tensor, values: Sequence[int] | Sequence[Sequence[int]]) -> None:
    """Copy `values` into `dst` (a device buffer of their shape) without waiting."""
    pinned = dst.device.type == "cuda"
    dst.copy_(torch.tensor(values, dtype=dst.dtype, pin_memory=pinned), non_blocking=pinned)
