"""Row-wise fused ops of the Llama block: RMSNorm (with the residual add) and SiLU-and-mul.

Each reads its input once and writes once, where the torch equivalents make several passes
(square, mean, rsqrt, two multiplies, casts). Rounding follows transformers' Llama so the GPU
path keeps the reference's numbers: RMSNorm normalises in float32, rounds to the input dtype,
then multiplies by the weight and rounds again (the product of the two rounded values computed
in float32 and rounded once is exactly torch's bf16 multiply); the residual add rounds like
torch's bf16 add. SiLU-and-mul is computed in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SILU_BLOCK = 1024


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`x / rms(x) * weight` over the last dim of x `[..., hidden]`; returns out, in x.dtype."""
    rows = _rows(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_rows = _rows(out)
    _launch_rms_norm(rows, rows, weight, out_rows, eps, add_residual=False)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: residual <- x + residual (rounded to the dtype), x <- rms_norm(residual).

    One pass instead of the add, the norm and their round trips through memory: the block's
    `h = h + f(norm(h))` step becomes this call with x holding f's output.
    """
    assert x.shape == residual.shape and x.dtype == residual.dtype
    _launch_rms_norm(_rows(x), _rows(residual), weight, _rows(x), eps, add_residual=True)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[T, 2*I]` (gate then up) -> `[T, I]` = silu(gate) * up, in float32, rounded once."""
    num_tokens, width = x.shape
    intermediate = width // 2
    assert x.stride(1) == 1 and width == 2 * intermediate
    if out is None:
        out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    assert out.stride(1) == 1
    if num_tokens == 0:
        return out
    grid = (num_tokens, triton.cdiv(intermediate, _SILU_BLOCK))
    _silu_and_mul_kernel[grid](
        x, out, intermediate, x.stride(0), out.stride(0), BLOCK=_SILU_BLOCK, num_warps=4
    )
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D view `[rows, hidden]` with a unit last stride (a view, so in-place ops land)."""
    rows = x if x.dim() == 2 else x.view(-1, x.shape[-1])
    assert rows.stride(1) == 1
    return rows


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    *,
    add_residual: bool,
) -> None:
    num_rows, hidden = x.shape
    assert weight.shape == (hidden,) and weight.stride(0) == 1
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x,
        residual,
        weight,
        out,
        hidden,
        x.stride(0),
        residual.stride(0),
        out.stride(0),
        eps,
        ADD_RESIDUAL=add_residual,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )


@triton.jit  # type: ignore[untyped-decorator]
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    hidden,
    stride_x,
    stride_residual,
    stride_out,
    eps,
    ADD_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(dtype)
        tl.store(residual_ptr + row * stride_residual + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, 0) / hidden
    normed = (x * tl.rsqrt(variance + eps)).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    result = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    out_ptr,
    intermediate,
    stride_x,
    stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    result = gate * tl.sigmoid(gate) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, result.to(out_ptr.dtype.element_ty), mask=mask)
