"""`kvmesh bench-engine`: the engine's speed, side by side with transformers, as ratios.

On CPU it compares, in one run and on the same prompts and weights:

- single-stream generation (one request, prompt to last token) against `generate` on one prompt;
- 16 concurrent requests through the async engine against `generate` one prompt at a time and
  against one left-padded batch of 16.

Every run generates exactly `max_tokens` tokens per prompt (EOS ignored on both sides), so the
work is the same. On a GPU, `gpu_report` measures prefill and decode next to their rooflines.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvmesh.bench.reference import transformers_model
from kvmesh.engine import (
    EngineCore,
    GenerateRequest,
    SamplingParams,
    TokenOutput,
    TorchEngine,
)


@dataclass(slots=True)
class CpuComparison:
    """Medians over alternating rounds; each ratio is the median of per-round ratios."""

    max_tokens: int
    concurrency: int
    rounds: int
    engine_single_stream_tokens_per_s: float
    transformers_single_stream_tokens_per_s: float
    engine_concurrent_tokens_per_s: float
    transformers_one_at_a_time_tokens_per_s: float
    transformers_padded_batch_tokens_per_s: float
    ratios: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _engine_run(engine: TorchEngine, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds to generate `max_tokens` for every prompt, all submitted at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        count = 0
        request = GenerateRequest(f"bench-{time.monotonic_ns()}-{i}", tuple(prompt), params)
        async for out in engine.generate(request):
            count += len(out.token_ids)
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - started
    assert all(c == max_tokens for c in counts)
    return elapsed


def _transformers_run(model: Any, prompts: list[list[int]], max_tokens: int, pad_id: int) -> float:
    """Seconds for transformers to generate `max_tokens` per prompt, as one left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] == width + max_tokens
    return elapsed


def compare_with_transformers(
    engine: TorchEngine, prompts: list[list[int]], max_tokens: int, *, rounds: int = 3
) -> CpuComparison:
    """The engine (not yet started) against transformers; `prompts` sets the concurrency.

    Shared machines are noisy, so engine and transformers runs alternate for `rounds` rounds
    and each round's ratio compares neighbouring runs. transformers one prompt at a time is
    slow and far behind, so it runs once.
    """
    core = engine.core
    model = transformers_model(core)
    pad_id = next(iter(core.eos_token_ids), 0)
    n, total = len(prompts), len(prompts) * max_tokens

    async def engine_run(batch: list[list[int]], tokens: int) -> float:
        return await _engine_run(engine, batch, tokens)

    def hf_run(batch: list[list[int]], tokens: int) -> float:
        return _transformers_run(model, batch, tokens, pad_id)

    async def measure() -> dict[str, list[float]]:
        await engine.start()
        times: dict[str, list[float]] = {"single": [], "hf_single": [], "conc": [], "padded": []}
        await engine_run(prompts[:1], 2)  # warm-up: one-time costs stay out of the numbers
        hf_run(prompts[:1], 2)
        for _ in range(rounds):
            times["single"].append(await engine_run(prompts[:1], max_tokens))
            times["hf_single"].append(hf_run(prompts[:1], max_tokens))
            times["conc"].append(await engine_run(prompts, max_tokens))
            times["padded"].append(hf_run(prompts, max_tokens))
        await engine.stop()
        return times

    times = asyncio.run(measure())
    serial = sum(hf_run([p], max_tokens) for p in prompts)
    single = [max_tokens / t for t in times["single"]]
    hf_single = [max_tokens / t for t in times["hf_single"]]
    conc = [total / t for t in times["conc"]]
    padded = [total / t for t in times["padded"]]
    return CpuComparison(
        max_tokens=max_tokens,
        concurrency=n,
        rounds=rounds,
        engine_single_stream_tokens_per_s=statistics.median(single),
        transformers_single_stream_tokens_per_s=statistics.median(hf_single),
        engine_concurrent_tokens_per_s=statistics.median(conc),
        transformers_one_at_a_time_tokens_per_s=total / serial,
        transformers_padded_batch_tokens_per_s=statistics.median(padded),
        ratios={
            "single_stream_vs_transformers": statistics.median(
                a / b for a, b in zip(single, hf_single, strict=True)
            ),
            "concurrent_vs_transformers_one_at_a_time": statistics.median(conc) / (total / serial),
            "concurrent_vs_transformers_padded_batch": statistics.median(
                a / b for a, b in zip(conc, padded, strict=True)
            ),
        },
    )


# -- GPU: prefill and decode against their rooflines -----------------------------------------------

_GPU_PEAKS = {  # dense bf16 TFLOP/s and HBM TB/s from the vendor's datasheets (SXM parts)
    "H100": (989.4, 3.35),
    "H200": (989.4, 4.8),
}


def gpu_peaks(name: str) -> tuple[float, float] | None:
    for key, peaks in _GPU_PEAKS.items():
        if key in name:
            return peaks
    return None


def _random_prompt(rng: random.Random, length: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(10, vocab) for _ in range(length))


def _sync(core: EngineCore) -> None:
    if core.model.device.type == "cuda":
        torch.cuda.synchronize(core.model.device)


def measure_prefill(core: EngineCore, num_tokens: int, repeats: int = 3) -> float:
    """Best prefill throughput (tokens/s) for one prompt of `num_tokens`, computed in one step."""
    assert core.scheduler.max_num_batched_tokens >= num_tokens
    rng = random.Random(0)
    vocab = core.model_config.vocab_size
    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up
        prompt = _random_prompt(rng, num_tokens, vocab)
        core.add(GenerateRequest(f"prefill-{i}", prompt, SamplingParams(max_tokens=1)))
        _sync(core)
        started = time.perf_counter()
        core.step()
        _sync(core)
        if i:
            best = min(best, time.perf_counter() - started)
        assert not core.has_work
    return num_tokens / best


def measure_decode(core: EngineCore, batch: int, context: int, steps: int) -> float:
    """Decode throughput (tokens/s) with `batch` sequences of about `context` tokens each."""
    rng = random.Random(batch)
    vocab = core.model_config.vocab_size
    # Early sequences decode while later ones still prefill: leave them room to keep going.
    params = SamplingParams(max_tokens=2 * steps + 64, temperature=0.0, ignore_eos=True)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for request_id in ids:
        core.add(GenerateRequest(request_id, _random_prompt(rng, context, vocab), params))
    while core.scheduler.waiting or any(s.is_prefilling for s in core.scheduler.running):
        core.step()
    for _ in range(3):  # warm-up decode steps
        core.step()
    _sync(core)
    started = time.perf_counter()
    produced = 0
    for _ in range(steps):
        produced += sum(len(o.token_ids) for o in core.step() if isinstance(o, TokenOutput))
    _sync(core)
    elapsed = time.perf_counter() - started
    for request_id in ids:
        core.abort(request_id)
    assert produced == batch * steps, (produced, batch, steps)
    return produced / elapsed


def gpu_report(
    core: EngineCore,
    *,
    prefill_tokens: int,
    batches: list[int],
    context: int,
    steps: int,
    peaks: tuple[float, float] | None,
) -> dict[str, Any]:
    params = core.model_config.num_parameters
    weight_bytes = core.model.weight_bytes
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(core.model.device)
        if core.model.device.type == "cuda"
        else "cpu",
        "model": core.info.model_id,
        "dtype": core.info.dtype,
        "parameters": params,
        "weight_bytes": weight_bytes,
        "peak_bf16_tflops": peaks[0] if peaks else None,
        "hbm_tb_per_s": peaks[1] if peaks else None,
    }
    prefill = measure_prefill(core, prefill_tokens)
    report["prefill"] = {"prompt_tokens": prefill_tokens, "tokens_per_s": prefill}
    if peaks:
        roofline = peaks[0] * 1e12 / (2 * params)
        report["prefill"] |= {"roofline_tokens_per_s": roofline, "fraction": prefill / roofline}
    report["decode"] = []
    for batch in batches:
        rate = measure_decode(core, batch, context, steps)
        row: dict[str, Any] = {"batch": batch, "context": context, "tokens_per_s": rate}
        if peaks:
            roofline = batch * peaks[1] * 1e12 / weight_bytes
            row |= {"roofline_tokens_per_s": roofline, "fraction": rate / roofline}
        report["decode"].append(row)
    return report
