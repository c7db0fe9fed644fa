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
from kvmesh.engine.torch_engine import TorchCore, TorchEngine
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, TokenOutput


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


# -- GPU: prefill and decode against their rooflines, and transformers side by side --------------

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


def _sync(core: TorchCore) -> None:
    if core.model.device.type == "cuda":
        torch.cuda.synchronize(core.model.device)


def _first_token_seconds(core: TorchCore, request_id: str, prompt: tuple[int, ...]) -> float:
    """Seconds from submitting a prompt to its first token (its prefill, in one or more steps)."""
    params = SamplingParams(max_tokens=1, temperature=0.0)  # greedy, as every run here
    core.add(GenerateRequest(request_id, prompt, params))
    _sync(core)
    started = time.perf_counter()
    while core.has_work:
        core.step()
    _sync(core)
    return time.perf_counter() - started


def measure_prefill(core: TorchCore, num_tokens: int, repeats: int = 3) -> float:
    """Best prefill throughput (tokens/s) for one prompt of `num_tokens`, computed in one step."""
    assert core.scheduler.max_num_batched_tokens >= num_tokens
    rng = random.Random(0)
    vocab = core.model_config.vocab_size
    times = [
        _first_token_seconds(core, f"prefill-{i}", _random_prompt(rng, num_tokens, vocab))
        for i in range(repeats + 1)  # the first run warms up
    ]
    return num_tokens / min(times[1:])


def measure_prefix_hit(
    core: TorchCore, num_tokens: int, cached_tokens: int, repeats: int = 3
) -> dict[str, float]:
    """A prompt whose first `cached_tokens` are in the prefix cache against the same prompt
    uncached: seconds to the first token each (best of `repeats`), and the speed-up."""
    rng = random.Random(1)
    vocab = core.model_config.vocab_size
    cold: list[float] = []
    warm: list[float] = []
    for i in range(repeats + 1):
        prefix = _random_prompt(rng, cached_tokens, vocab)
        tail = _random_prompt(rng, num_tokens - cached_tokens, vocab)
        other_tail = _random_prompt(rng, num_tokens - cached_tokens, vocab)
        cold_s = _first_token_seconds(core, f"cold-{i}", prefix + tail)  # caches the prefix
        warm_s = _first_token_seconds(core, f"warm-{i}", prefix + other_tail)
        if i:  # the first round warms up
            cold.append(cold_s)
            warm.append(warm_s)
    return {
        "prompt_tokens": num_tokens,
        "cached_tokens": cached_tokens,
        "uncached_seconds": min(cold),
        "cached_seconds": min(warm),
        "speedup": min(cold) / min(warm),
    }


def measure_decode(core: TorchCore, batch: int, context: int, steps: int) -> float:
    """Decode throughput (tokens/s) with `batch` sequences of about `context` tokens each."""
    rng = random.Random(batch)
    vocab = core.model_config.vocab_size
    # Early sequences decode while later ones still prefill: leave them room to keep going.
    params = SamplingParams(max_tokens=2 * steps + 64, temperature=0.0, ignore_eos=True)
    ids = [f"decode-{batch}-{context}-{i}" for i in range(batch)]
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


def measure_generate(core: TorchCore, batch: int, context: int, max_tokens: int) -> float:
    """End to end (prefill included) tokens/s: `batch` prompts of `context` tokens submitted
    at once, `max_tokens` each."""
    rng = random.Random(7)
    vocab = core.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [_random_prompt(rng, context, vocab) for _ in range(batch)]
    _sync(core)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add(GenerateRequest(f"generate-{i}", prompt, params))
    produced = 0
    while core.has_work:
        produced += sum(len(o.token_ids) for o in core.step() if isinstance(o, TokenOutput))
    _sync(core)
    assert produced == batch * max_tokens
    return produced / (time.perf_counter() - started)


def transformers_rates(
    core: TorchCore, batch: int, context: int, short: int, long: int
) -> dict[str, float]:
    """transformers' `generate` on the engine's weights: end-to-end tokens/s for `long` new
    tokens, and its decode rate from the difference between `long` and `short` new tokens
    (its prefill cancels out)."""
    model = transformers_model(core)
    rng = random.Random(7)
    vocab = core.model_config.vocab_size
    prompts = [list(_random_prompt(rng, context, vocab)) for _ in range(batch)]
    pad_id = next(iter(core.eos_token_ids), 0)
    _transformers_run(model, prompts, 2, pad_id)  # warm-up
    short_s = min(_transformers_run(model, prompts, short, pad_id) for _ in range(2))
    long_s = min(_transformers_run(model, prompts, long, pad_id) for _ in range(2))
    del model
    torch.cuda.empty_cache()
    return {
        "generate_tokens_per_s": batch * long / long_s,
        "decode_tokens_per_s": batch * (long - short) / (long_s - short_s),
    }


def kv_bytes_per_token(core: TorchCore) -> int:
    layout = core.kv_cache.layout
    return layout.bytes_per_block // layout.block_size


def engine_header(core: TorchCore) -> dict[str, Any]:
    """What every engine benchmark's report starts with: the card, the model, how it runs."""
    return {
        "device": torch.cuda.get_device_name(core.model.device)
        if core.model.device.type == "cuda"
        else "cpu",
        "model": core.info.model_id,
        "dtype": core.info.dtype,
        "attention_backend": core.info.attention_backend,
        "cuda_graphs": core.info.cuda_graphs,
    }


def gpu_report(
    core: TorchCore,
    *,
    prefill_tokens: int,
    cached_tokens: int,
    batches: list[int],
    context: int,
    long_context: int,
    long_batch: int,
    steps: int,
    transformers_batch: int,
    peaks: tuple[float, float] | None,
) -> dict[str, Any]:
    """Prefill, a prefix hit, decode at several batches and contexts against rooflines, and
    transformers' `generate` on the same weights, in one run."""
    params = core.model_config.num_parameters
    weight_bytes = core.model.weight_bytes
    kv_token = kv_bytes_per_token(core)
    report: dict[str, Any] = {
        **engine_header(core),
        "async_scheduling": core.async_scheduling,
        "parameters": params,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_token,
        "peak_bf16_tflops": peaks[0] if peaks else None,
        "hbm_tb_per_s": peaks[1] if peaks else None,
    }
    prefill = measure_prefill(core, prefill_tokens)
    report["prefill"] = {"prompt_tokens": prefill_tokens, "tokens_per_s": prefill}
    if peaks:
        roofline = peaks[0] * 1e12 / (2 * params)
        report["prefill"] |= {"roofline_tokens_per_s": roofline, "fraction": prefill / roofline}
    report["prefix_hit"] = measure_prefix_hit(core, prefill_tokens, cached_tokens)
    report["decode"] = []
    shapes = [(b, context) for b in batches] + ([(long_batch, long_context)] if long_batch else [])
    for batch, ctx in shapes:
        rate = measure_decode(core, batch, ctx, steps)
        row: dict[str, Any] = {
            "batch": batch,
            "context": ctx,
            "tokens_per_s": rate,
            "step_ms": 1e3 * batch / rate,
        }
        if peaks:
            bandwidth = peaks[1] * 1e12
            # The context grows by one token a step: count the middle of the timed steps.
            kv_read = batch * (ctx + 3 + steps / 2) * kv_token
            weights_only = batch * bandwidth / weight_bytes
            with_kv = batch * bandwidth / (weight_bytes + kv_read)
            row |= {
                "roofline_tokens_per_s": weights_only,
                "fraction": rate / weights_only,
                "kv_bytes_read_per_step": kv_read,
                "roofline_with_kv_tokens_per_s": with_kv,
                "fraction_with_kv": rate / with_kv,
            }
        report["decode"].append(row)
    if transformers_batch:
        short, long = 16, 16 + steps
        hf = transformers_rates(core, transformers_batch, context, short, long)
        engine_generate = measure_generate(core, transformers_batch, context, long)
        engine_decode = next(
            (r["tokens_per_s"] for r in report["decode"] if r["batch"] == transformers_batch),
            measure_decode(core, transformers_batch, context, steps),
        )
        report["transformers"] = {
            "batch": transformers_batch,
            "context": context,
            "new_tokens": long,
            "transformers_decode_tokens_per_s": hf["decode_tokens_per_s"],
            "engine_decode_tokens_per_s": engine_decode,
            "decode_ratio": engine_decode / hf["decode_tokens_per_s"],
            "transformers_generate_tokens_per_s": hf["generate_tokens_per_s"],
            "engine_generate_tokens_per_s": engine_generate,
            "generate_ratio": engine_generate / hf["generate_tokens_per_s"],
        }
    return report


def gpu_blocks_needed(
    *,
    block_size: int,
    prefill_tokens: int,
    batches: list[int],
    context: int,
    long_context: int,
    long_batch: int,
    steps: int,
) -> int:
    """KV blocks the GPU report needs at once, with room: the pool is sized to this, not to
    the free memory, so transformers' copy of the model fits beside it."""
    per_seq = 2 * steps + 64 + 2 * block_size
    need = max(
        max(batches) * (context + per_seq),
        long_batch * (long_context + per_seq),
        3 * prefill_tokens,
    )
    return int(1.1 * need / block_size) + 64
