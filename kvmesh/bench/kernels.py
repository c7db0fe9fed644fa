"""`python -m kvmesh.bench.kernels --device cuda [--json-out PATH]`: the Triton kernels on the GPU.

For the Llama-3.1-8B shape (32 q heads, 8 KV heads, head_dim 128, bf16, block size 16, K/V in
a strided layer view of a two-layer cache, blocks scattered at random) it checks each kernel
once against its reference (relative Frobenius error against float32 math), then times it with
`triton.testing.do_bench` (median, L2 flushed before each call: "eager") and, for decode, also
replayed from a CUDA graph as the engine runs it ("graph", L2 warm, no launch overhead):

- paged decode attention at (batch, context) in (1,512) (32,512) (64,512) (32,4096): GB/s of
  K/V read and the fraction of the HBM peak; the torch reference `paged_decode` next to it;
- a sweep of stage-1 configs x num_splits at (32,4096) and (1,512), to pick the defaults;
- prefill attention, 2048 fresh tokens and 512 queries over a 2048 context: TFLOP/s counting
  only the causal half; torch's SDPA (flash) on contiguous K/V and `paged_prefill` next to it;
- rms_norm, fused_add_rms_norm, rope_and_write_kv, silu_and_mul on 2048-token inputs: GB/s,
  with their torch equivalents.

The whole run takes about a minute on an H100. Exit status 1 if any check fails (error > 2e-2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from kvmesh.engine.attention.paged import paged_decode, paged_prefill
from kvmesh.engine.kernels import (
    DecodeConfig,
    PrefillConfig,
    choose_num_splits,
    choose_prefill_config,
    decode_workspace,
    fused_add_rms_norm,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rope_and_write_kv,
    silu_and_mul,
)

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN, INTERMEDIATE, TOKENS = 4096, 14336, 2048
DECODE_CASES = ((1, 512), (32, 512), (64, 512), (32, 4096))
SWEEP_CASES = ((32, 4096), (1, 512))
PREFILL_CASES = ((2048, 2048), (512, 2048))  # (queries, context including them)
SWEEP_CONFIGS = (
    DecodeConfig(block_n=32, num_warps=4, num_stages=2),
    DecodeConfig(block_n=64, num_warps=4, num_stages=2),
    DecodeConfig(block_n=64, num_warps=4, num_stages=3),
    DecodeConfig(block_n=128, num_warps=8, num_stages=2),
)
PREFILL_SWEEP_CONFIGS = (
    PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
    PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    PrefillConfig(block_m=64, block_n=128, num_warps=4, num_stages=2),
    PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=3),
)
MAX_ERROR = 2e-2
_PEAK_TBPS = {"H100": 3.35, "H200": 4.8}  # HBM bandwidth, SXM parts


@dataclass(slots=True)
class Result:
    name: str
    shape: str
    ms: float  # eager median (L2 flushed)
    graph_ms: float | None = None  # CUDA-graph replay
    gb_per_s: float | None = None  # from the faster of the two
    peak_fraction: float | None = None
    tflop_per_s: float | None = None
    error: float | None = None  # relative Frobenius error against the reference
    note: str = ""


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (out.double() - reference.double()).norm()
    return float(diff / reference.double().norm().clamp_min(1e-30))


def _eager_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, return_mode="median"))


def _graph_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))


class _Bench:
    def __init__(self, device: torch.device, peak_tbps: float) -> None:
        self.device = device
        self.peak_bytes_per_s = peak_tbps * 1e12
        self.results: list[Result] = []
        self.failed: list[str] = []
        num_blocks = 32 * 4096 // BLOCK_SIZE + 64
        whole = torch.randn(
            (num_blocks, 2, BLOCK_SIZE, 2, NUM_KV_HEADS, HEAD_DIM),
            dtype=torch.bfloat16,
            device=device,
        )
        self.layer_cache = whole[:, 1]
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def record(
        self, result: Result, nbytes: float | None = None, flops: float | None = None
    ) -> None:
        best_s = min(result.ms, result.graph_ms or math.inf) / 1e3
        if nbytes is not None:
            result.gb_per_s = nbytes / best_s / 1e9
            result.peak_fraction = nbytes / best_s / self.peak_bytes_per_s
        if flops is not None:
            result.tflop_per_s = flops / best_s / 1e12
        if result.error is not None and result.error > MAX_ERROR:
            self.failed.append(f"{result.name} {result.shape}: error {result.error:.2e}")
        self.results.append(result)
        _print_row(result)

    def tables(self, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random distinct blocks per sequence (scattered like a long-running cache)."""
        per_seq = -(-context // BLOCK_SIZE)
        ids = torch.randperm(self.layer_cache.shape[0], device=self.device)[: batch * per_seq]
        tables = ids.view(batch, per_seq).to(torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        return tables, lens

    def decode(self) -> None:
        for batch, context in DECODE_CASES:
            self._decode_case(batch, context)

    def _decode_case(self, batch: int, context: int) -> None:
        scale = HEAD_DIM**-0.5
        tables, lens = self.tables(batch, context)
        q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device)
        splits = choose_num_splits(batch, NUM_KV_HEADS, context, self.num_sms)
        out = torch.empty_like(q)
        workspace = decode_workspace(batch, NUM_Q_HEADS, HEAD_DIM, splits, self.device)
        run = partial(
            paged_decode_attention, q, self.layer_cache, tables, lens, scale,
            num_splits=splits, out=out, workspace=workspace,
        )  # fmt: skip
        run()
        reference = paged_decode(q.float(), self.layer_cache.float(), tables, lens, scale)
        error = _relative_error(out, reference)
        nbytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * 2
        shape = f"B={batch} ctx={context}"
        result = Result("decode triton", shape, _eager_ms(run), _graph_ms(run), error=error)
        result.note = f"splits={splits}"
        self.record(result, nbytes)
        torch_run = partial(paged_decode, q, self.layer_cache, tables, lens, scale)
        error = _relative_error(torch_run(), reference)
        self.record(
            Result("decode torch paged_decode", shape, _eager_ms(torch_run), error=error), nbytes
        )

    def decode_sweep(self) -> None:
        for batch, context in SWEEP_CASES:
            self._sweep_case(batch, context)

    def _sweep_case(self, batch: int, context: int) -> None:
        scale = HEAD_DIM**-0.5
        tables, lens = self.tables(batch, context)
        q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device)
        chosen = choose_num_splits(batch, NUM_KV_HEADS, context, self.num_sms)
        nbytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * 2
        workspace = decode_workspace(batch, NUM_Q_HEADS, HEAD_DIM, 4 * chosen, self.device)
        out = torch.empty_like(q)
        for config in SWEEP_CONFIGS:
            for splits in sorted({max(chosen // 2, 1), chosen, 2 * chosen, 4 * chosen}):
                run = partial(
                    paged_decode_attention, q, self.layer_cache, tables, lens, scale,
                    num_splits=splits, out=out, workspace=workspace, config=config,
                )  # fmt: skip
                result = Result(
                    "decode sweep", f"B={batch} ctx={context}", _eager_ms(run), _graph_ms(run)
                )
                result.note = (
                    f"block_n={config.block_n} warps={config.num_warps} "
                    f"stages={config.num_stages} splits={splits}"
                    + (" (chosen)" if splits == chosen else "")
                )
                self.record(result, nbytes)

    def prefill(self) -> None:
        for num_query, context in PREFILL_CASES:
            self._prefill_case(num_query, context)

    def _prefill_case(self, num_query: int, context: int) -> None:
        scale = HEAD_DIM**-0.5
        tables, lens = self.tables(1, context)
        q = torch.randn(num_query, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device)
        cu = torch.tensor([0, num_query], dtype=torch.int32, device=self.device)
        out = torch.empty_like(q)
        run = partial(
            paged_prefill_attention, q, self.layer_cache, tables, cu, lens, scale,
            max_query_len=num_query, out=out,
        )  # fmt: skip
        run()
        reference = paged_prefill(q.float(), self.layer_cache.float(), tables, cu, lens, scale)
        error = _relative_error(out, reference)
        positions = torch.arange(context - num_query, context, dtype=torch.float64)
        flops = 4.0 * NUM_Q_HEADS * HEAD_DIM * float((positions + 1).sum())
        shape = f"q={num_query} ctx={context}"
        self.record(Result("prefill triton", shape, _eager_ms(run), error=error), flops=flops)
        torch_run = partial(paged_prefill, q, self.layer_cache, tables, cu, lens, scale)
        self.record(Result("prefill torch paged_prefill", shape, _eager_ms(torch_run)), flops=flops)
        self.record(self._sdpa_flash(q, tables, context, scale, shape), flops=flops)

    def prefill_sweep(self) -> None:
        """Tile shapes for the prefix-hit case and a fresh prompt, to pick the defaults."""
        scale = HEAD_DIM**-0.5
        for num_query, context in PREFILL_CASES:
            tables, lens = self.tables(1, context)
            q = torch.randn(
                num_query, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device
            )
            cu = torch.tensor([0, num_query], dtype=torch.int32, device=self.device)
            out = torch.empty_like(q)
            positions = torch.arange(context - num_query, context, dtype=torch.float64)
            flops = 4.0 * NUM_Q_HEADS * HEAD_DIM * float((positions + 1).sum())
            chosen = choose_prefill_config(num_query, 1, NUM_Q_HEADS, HEAD_DIM, self.num_sms)
            for config in PREFILL_SWEEP_CONFIGS:
                run = partial(
                    paged_prefill_attention, q, self.layer_cache, tables, cu, lens, scale,
                    max_query_len=num_query, out=out, config=config,
                )  # fmt: skip
                try:
                    result = Result("prefill sweep", f"q={num_query} ctx={context}", _eager_ms(run))
                except Exception as e:  # out of shared memory or registers: say so, go on
                    click.echo(f"prefill sweep {config}: {type(e).__name__}")
                    continue
                result.note = (
                    f"block_m={config.block_m} block_n={config.block_n} "
                    f"warps={config.num_warps} stages={config.num_stages}"
                    + (" (chosen)" if config == chosen else "")
                )
                self.record(result, flops=flops)

    def _sdpa_flash(
        self, q: torch.Tensor, tables: torch.Tensor, context: int, scale: float, shape: str
    ) -> Result:
        """torch's SDPA on K/V already gathered contiguous (GQA heads expanded): flash for a
        fresh prompt; over a prefix, the lower-right causal bias (flash or memory-efficient,
        as torch picks)."""
        kv = self.layer_cache[tables[0].long()].flatten(0, 1)[:context]
        group = NUM_Q_HEADS // NUM_KV_HEADS
        keys = kv[:, 0].transpose(0, 1).repeat_interleave(group, 0)[None].contiguous()
        values = kv[:, 1].transpose(0, 1).repeat_interleave(group, 0)[None].contiguous()
        queries = q.transpose(0, 1)[None].contiguous()
        sdpa = F.scaled_dot_product_attention
        if q.shape[0] == context:
            run = partial(sdpa, queries, keys, values, is_causal=True, scale=scale)
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return Result("prefill torch SDPA flash (contig)", shape, _eager_ms(run))
            except RuntimeError:  # no flash kernel for this GPU or dtype
                return Result("prefill torch SDPA (contig)", shape, _eager_ms(run))
        mask = causal_lower_right(q.shape[0], context)
        ms = _eager_ms(partial(sdpa, queries, keys, values, mask, scale=scale))
        return Result("prefill torch SDPA lower-right (contig)", shape, ms)

    def fused(self) -> None:
        device, bf16 = self.device, torch.bfloat16
        x = torch.randn(TOKENS, HIDDEN, dtype=bf16, device=device)
        residual = torch.randn_like(x)
        weight = torch.randn(HIDDEN, dtype=bf16, device=device)
        out = torch.empty_like(x)
        xf = x.float()
        expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf16) * weight
        rms_norm(x, weight, 1e-5, out=out)
        shape = f"{TOKENS}x{HIDDEN}"
        row_bytes = TOKENS * HIDDEN * 2
        self.record(
            Result(
                "rms_norm triton", shape, _eager_ms(lambda: rms_norm(x, weight, 1e-5, out=out)),
                error=_relative_error(out, expected),
            ),
            2 * row_bytes,
        )  # fmt: skip
        self.record(
            Result(
                "rms_norm torch F.rms_norm", shape,
                _eager_ms(lambda: F.rms_norm(x, (HIDDEN,), weight, 1e-5)),
            ),
            2 * row_bytes,
        )  # fmt: skip

        x2, residual2 = x.clone(), residual.clone()
        fused_add_rms_norm(x2, residual2, weight, 1e-5)
        summed = (x + residual).float()
        expected = (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf16)
        error = _relative_error(x2, expected * weight)  # before timing runs it again in place
        self.record(
            Result(
                "fused_add_rms_norm triton", shape,
                _eager_ms(lambda: fused_add_rms_norm(x2, residual2, weight, 1e-5)), error=error,
            ),
            4 * row_bytes,
        )  # fmt: skip

        def torch_add_norm() -> torch.Tensor:
            residual2.add_(x2)
            return F.rms_norm(residual2, (HIDDEN,), weight, 1e-5)

        self.record(
            Result("fused_add_rms_norm torch add+F.rms_norm", shape, _eager_ms(torch_add_norm)),
            4 * row_bytes,
        )
        self._rope()
        self._silu()

    def _rope(self) -> None:
        device = self.device
        width = (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
        qkv = torch.randn(TOKENS, width, dtype=torch.bfloat16, device=device)
        positions = torch.arange(TOKENS, device=device)
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device) / HEAD_DIM))
        angles = torch.outer(torch.arange(8192, device=device).float(), inv_freq)
        cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
        slots = torch.randperm(self.layer_cache.shape[0] * BLOCK_SIZE, device=device)[:TOKENS]

        def run(buffer: torch.Tensor) -> None:
            rope_and_write_kv(
                buffer, positions, cos_sin, self.layer_cache, slots,
                num_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
            )  # fmt: skip

        expected = qkv.clone()
        _torch_rope_and_write(expected, positions, cos_sin, self.layer_cache, slots)
        rotated = qkv.clone()
        run(rotated)
        written = self.layer_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE]
        kv_expected = expected[:, NUM_Q_HEADS * HEAD_DIM :].reshape(written.shape)
        error = max(_relative_error(rotated, expected), _relative_error(written, kv_expected))
        nbytes = TOKENS * HEAD_DIM * 2 * (2 * NUM_Q_HEADS + 5 * NUM_KV_HEADS)
        shape = f"T={TOKENS} qkv={width}"
        triton_ms = _eager_ms(partial(run, qkv))
        self.record(Result("rope_and_write_kv triton", shape, triton_ms, error=error), nbytes)
        torch_run = partial(_torch_rope_and_write, qkv, positions, cos_sin, self.layer_cache, slots)
        self.record(Result("rope_and_write_kv torch", shape, _eager_ms(torch_run)), nbytes)

    def _silu(self) -> None:
        x = torch.randn(TOKENS, 2 * INTERMEDIATE, dtype=torch.bfloat16, device=self.device)
        out = torch.empty(TOKENS, INTERMEDIATE, dtype=torch.bfloat16, device=self.device)
        gate, up = x.float().chunk(2, dim=-1)
        silu_and_mul(x, out=out)
        nbytes = TOKENS * INTERMEDIATE * 2 * 3
        shape = f"{TOKENS}x{2 * INTERMEDIATE}"
        self.record(
            Result(
                "silu_and_mul triton", shape, _eager_ms(lambda: silu_and_mul(x, out=out)),
                error=_relative_error(out, (F.silu(gate) * up).bfloat16()),
            ),
            nbytes,
        )  # fmt: skip
        g, u = x[:, :INTERMEDIATE], x[:, INTERMEDIATE:]
        self.record(
            Result("silu_and_mul torch F.silu(g)*u", shape, _eager_ms(lambda: F.silu(g) * u)),
            nbytes,
        )


def _torch_rope_and_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    layer_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """The unfused equivalent: rotate q and k in float32, write back, scatter k and v."""
    tokens, half = qkv.shape[0], HEAD_DIM // 2
    cos, sin = (t[:, None] for t in cos_sin[positions].chunk(2, dim=-1))
    heads = qkv.view(tokens, -1, HEAD_DIM)
    rotated = heads[:, : NUM_Q_HEADS + NUM_KV_HEADS].float()
    x1, x2 = rotated[..., :half], rotated[..., half:]
    heads[:, : NUM_Q_HEADS + NUM_KV_HEADS] = torch.cat(
        [x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1
    ).to(qkv.dtype)
    kv = heads[:, NUM_Q_HEADS:].view(tokens, 2, NUM_KV_HEADS, HEAD_DIM)
    layer_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = kv


_COLUMNS = (("eager us", 9), ("graph us", 9), ("GB/s", 8), ("peak", 6), ("TFLOP/s", 7))


def _print_header() -> None:
    columns = " ".join(f"{title:>{width}s}" for title, width in _COLUMNS)
    click.echo(f"{'kernel':40s} {'shape':20s} {columns} {'error':>8s}  note")


def _print_row(r: Result) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    graph_us = None if r.graph_ms is None else r.graph_ms * 1e3
    values = (
        fmt(r.ms * 1e3, ".1f"),
        fmt(graph_us, ".1f"),
        fmt(r.gb_per_s, ".0f"),
        fmt(r.peak_fraction, ".1%"),
        fmt(r.tflop_per_s, ".1f"),
    )
    columns = " ".join(f"{v:>{width}s}" for v, (_, width) in zip(values, _COLUMNS, strict=True))
    click.echo(f"{r.name:40s} {r.shape:20s} {columns} {fmt(r.error, '.1e'):>8s}  {r.note}")


def _peak_tbps(device: torch.device) -> float:
    name = torch.cuda.get_device_name(device)
    return next((tbps for key, tbps in _PEAK_TBPS.items() if key in name), 3.35)


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--peak-tbps", type=float, default=None, help="HBM peak [default: by GPU name]")
def main(device: str, json_out: Path | None, peak_tbps: float | None) -> None:
    torch_device = torch.device(device)
    if torch_device.type != "cuda" or not torch.cuda.is_available():
        raise click.UsageError("the kernels need a CUDA device")
    torch.manual_seed(0)
    peak = peak_tbps or _peak_tbps(torch_device)
    bench = _Bench(torch_device, peak)
    click.echo(f"{torch.cuda.get_device_name(torch_device)}, HBM peak {peak} TB/s")
    _print_header()
    bench.decode()
    bench.decode_sweep()
    bench.prefill()
    bench.prefill_sweep()
    bench.fused()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(torch_device),
        "peak_tbps": peak,
        "results": [asdict(r) for r in bench.results],
        "failed": bench.failed,
    }
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
    if bench.failed:
        raise click.ClickException("checks failed: " + "; ".join(bench.failed))


if __name__ == "__main__":
    main()
