"""`python -m kvmesh.bench.profile`: where a step's GPU time goes, kernel by kernel.

Runs the torch engine on the GPU (dummy weights at a real shape), then profiles a few decode
steps at a batch and context, and the prefill of a prompt whose prefix is cached, with
PyTorch's profiler; prints the CUDA kernels by total time for each. Measure before optimizing.
"""

from __future__ import annotations

import random
import time
from typing import Any

import click
import torch
from torch.profiler import ProfilerActivity, profile

from kvmesh.bench.engine import _first_token_seconds, _random_prompt, gpu_blocks_needed
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest


def _top(prof: profile, title: str, rows: int) -> None:
    click.echo(f"--- {title}")
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=rows)
    click.echo(table)


@click.command()
@click.option("--model", default="dummy:llama-3.1-8b", show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--context", default=512, show_default=True)
@click.option("--prompt-tokens", default=2048, show_default=True)
@click.option("--cached-tokens", default=1536, show_default=True)
@click.option("--steps", default=5, show_default=True, help="decode steps profiled")
@click.option("--rows", default=15, show_default=True)
def main(
    model: str,
    batch: int,
    context: int,
    prompt_tokens: int,
    cached_tokens: int,
    steps: int,
    rows: int,
) -> None:
    blocks = gpu_blocks_needed(
        block_size=16,
        prefill_tokens=prompt_tokens,
        batches=[batch],
        context=context,
        long_context=0,
        long_batch=0,
        steps=steps + 8,
    )
    config = EngineConfig(
        model=model,
        device="cuda",
        num_blocks=blocks,
        max_num_seqs=max(batch, 64),
        max_num_batched_tokens=max(2048, prompt_tokens),
    )
    core = TorchCore(config, show_progress=False)
    core.warm_up()
    rng = random.Random(0)
    vocab = core.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        core.add(GenerateRequest(f"p-{i}", _random_prompt(rng, context, vocab), params))
    while core.scheduler.waiting or any(s.is_prefilling for s in core.scheduler.running):
        core.step()
    core.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    _top(prof, f"{steps} decode steps, batch {batch}, context {context}", rows)
    while core.has_work:
        core.step()
    prefix = _random_prompt(rng, cached_tokens, vocab)
    tail = prompt_tokens - cached_tokens
    _first_token_seconds(core, "cold", prefix + _random_prompt(rng, tail, vocab))
    _first_token_seconds(core, "warm-up", prefix + _random_prompt(rng, tail, vocab))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds = _first_token_seconds(core, "hit", prefix + _random_prompt(rng, tail, vocab))
    _top(prof, f"prefill of {prompt_tokens} tokens, {cached_tokens} cached: {seconds:.4f} s", rows)
    _phases(core, rng, prefix, tail)


def _phases(core: TorchCore, rng: random.Random, prefix: tuple[int, ...], tail: int) -> None:
    """Wall time of a prefix-hit prefill's phases: the core around the launch, the metadata,
    the forward pass and the sampling (synchronized at each boundary)."""
    runner = core.runner
    marks: dict[str, float] = {}
    launch, build, forward = runner.launch, runner.attention.build, runner.model.forward

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - started
            return result

        return run

    runner.launch = timed("launch", launch)  # type: ignore[method-assign]
    runner.attention.build = timed("metadata", build)  # type: ignore[method-assign]
    runner.model.forward = timed("forward", forward)  # type: ignore[method-assign]
    vocab = core.model_config.vocab_size
    try:
        total = _first_token_seconds(core, "phases", prefix + _random_prompt(rng, tail, vocab))
    finally:
        runner.launch, runner.attention.build, runner.model.forward = launch, build, forward  # type: ignore[method-assign]
    metadata = marks.get("metadata", 0.0)  # none built where a prefill graph replays
    click.echo(
        f"--- phases (ms): total {1e3 * total:.2f}, core outside the launch (scheduling, "
        f"reading the token) {1e3 * (total - marks['launch']):.2f}, metadata "
        f"{1e3 * metadata:.2f}, forward {1e3 * marks.get('forward', 0.0):.2f}, rest of the "
        f"launch (inputs, sampling, graph replays) "
        f"{1e3 * (marks['launch'] - metadata - marks.get('forward', 0.0)):.2f}"
    )


if __name__ == "__main__":
    main()
