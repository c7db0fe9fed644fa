"""`kvmesh bench-speculation`: n-gram speculative decoding against plain decoding, in one run.

Code-edit prompts (a file and an edit to make; the answer is the file again, edited) run through
one in-process engine at each batch size (1: prompts one after another; 16: all at once) in
each mode:

- `baseline`: no drafts, synchronous scheduling (as every speculative mode runs);
- `baseline_async`: no drafts, async scheduling (the engine's default where the executor runs
  ahead of the host, a GPU); only there;
- `ngram`: prompt-lookup drafts (`kvmesh.engine.drafts`), the real thing;
- `oracle`: drafts taken from the baseline run's own greedy output, so (numerics aside) every
  draft is accepted. Not a drafter anyone can deploy: the upper bound of what verifying k drafts
  per step buys on this model and device, and the honest way to measure the mechanism on dummy
  weights, whose output never repeats the prompt.

Greedy everywhere, so every mode must produce the baseline's tokens; the report counts the
requests whose tokens differ (bf16 numerics of a verify chunk can flip a near tie). The prefix
cache is off so that every mode computes its prompts. Tokens/s is end to end (prefill included)
and for decode alone (from the step at which every request has its first token).

With a tokenizer and chat template (SmolLM2), the prompts are text: a generated Python file and
an instruction to rename one function and give the whole file back. Without one (dummy weights),
they are the token ids of the `code-edit` workload (`kvmesh.bench.load.workloads`).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvmesh.bench.engine import engine_header
from kvmesh.bench.load.workloads import CodeEdit, TokenRange
from kvmesh.engine.drafts import Drafter, NgramDrafter
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.types import EngineStats, GenerateRequest, TokenOutput

MODES = ("baseline", "baseline_async", "ngram", "oracle")


@dataclass(frozen=True, slots=True)
class OracleDrafter:
    """Drafts from a reference run's greedy output (benchmarks only): the upper bound."""

    expected: dict[str, list[int]]  # request id -> its reference output tokens
    num_speculative_tokens: int

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        reference = self.expected.get(seq.request_id.split("/", 1)[-1], [])
        done = seq.num_output_tokens
        return reference[done : done + min(max_tokens, self.num_speculative_tokens)]


def _python_file(rng: random.Random, functions: int) -> tuple[str, str, str]:
    """A small Python module of `functions` functions, one to rename, and its new name."""
    verbs = ["compute", "scale", "merge", "filter", "count", "load", "check", "render"]
    nouns = ["totals", "prices", "records", "events", "scores", "orders", "items", "rows"]
    names: list[str] = []
    while len(names) < functions:
        name = f"{rng.choice(verbs)}_{rng.choice(nouns)}"
        if name not in names:
            names.append(name)
    blocks = []
    for name in names:
        limit, factor = rng.randint(2, 99), rng.randint(2, 9)
        blocks.append(
            f"def {name}(values, factor={factor}):\n"
            f'    """Return the {name.replace("_", " ")} above {limit}."""\n'
            f"    total = 0\n"
            f"    for value in values:\n"
            f"        if value > {limit}:\n"
            f"            total += value * factor\n"
            f"    return total\n"
        )
    old = rng.choice(names)
    return "\n\n".join(blocks), old, old.replace("_", "_all_", 1)


def text_prompts(core: TorchCore, count: int, functions: int, seed: int) -> list[list[int]]:
    tokenizer = core.tokenizer
    assert tokenizer is not None
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        source, old, new = _python_file(rng, functions)
        content = (
            f"Rename the function `{old}` to `{new}` in this Python file. Reply with the whole "
            f"file, changed, and nothing else.\n\n```python\n{source}```"
        )
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    return prompts


def workload_prompts(core: TorchCore, count: int, prompt_len: int, seed: int) -> list[list[int]]:
    """The code-edit workload's first turns (a file and an edit), cut to `prompt_len`."""
    vocab = core.model_config.vocab_size
    tokens = TokenRange(low=100, high=min(49_000, vocab))
    workload = CodeEdit(sessions=count, turns=1, file_len=max(prompt_len - 16, 1), edit_len=16)
    sessions = workload.make_sessions(np.random.default_rng(seed), tokens)
    return [list(s.turns[0].new_tokens[:prompt_len]) for s in sessions]


@dataclass(slots=True)
class _Run:
    outputs: dict[str, list[int]]
    seconds: float
    decode_seconds: float
    stats: EngineStats


def _sync(core: TorchCore) -> None:
    if core.model.device.type == "cuda":
        torch.cuda.synchronize(core.model.device)


def _run(core: TorchCore, prompts: dict[str, list[int]], params: SamplingParams, tag: str) -> _Run:
    """Submit the prompts at once, step to the end; request ids are `tag/<key>`."""
    core.stats = EngineStats()
    outputs: dict[str, list[int]] = {key: [] for key in prompts}
    _sync(core)
    started = time.perf_counter()
    for key, prompt in prompts.items():
        core.add(GenerateRequest(f"{tag}/{key}", tuple(prompt), params))
    all_started = None
    while core.has_work:
        for out in core.step():
            if isinstance(out, TokenOutput):
                outputs[out.request_id.split("/", 1)[1]] += out.token_ids
        if all_started is None and all(outputs.values()):
            _sync(core)
            all_started = time.perf_counter()
    _sync(core)
    ended = time.perf_counter()
    decode_from = all_started if all_started is not None else ended
    return _Run(outputs, ended - started, ended - decode_from, core.stats)


def _summary(run: _Run, reference: dict[str, list[int]] | None) -> dict[str, Any]:
    stats = run.stats
    generated = sum(len(t) for t in run.outputs.values())
    decode_tokens = generated - len(run.outputs)  # each request's first token comes from prefill
    row: dict[str, Any] = {
        "generated_tokens": generated,
        "seconds": run.seconds,
        "tokens_per_s": generated / run.seconds,
        "decode_seconds": run.decode_seconds,
        "decode_tokens_per_s": decode_tokens / run.decode_seconds if run.decode_seconds else None,
        "steps": stats.num_steps,
        "tokens_per_step": generated / max(stats.num_steps, 1),
        "verifications": stats.num_spec_verifications,
        "draft_tokens": stats.num_spec_draft_tokens,
        "accepted_tokens": stats.num_spec_accepted_tokens,
        "acceptance_rate": stats.spec_acceptance_rate if stats.num_spec_draft_tokens else None,
        "accepted_tokens_per_verification": (
            stats.num_spec_accepted_tokens / stats.num_spec_verifications
            if stats.num_spec_verifications
            else None
        ),
    }
    if reference is not None:
        row["requests_differing_from_baseline"] = sum(
            run.outputs[k] != reference[k] for k in reference
        )
    return row


def _mode_runs(
    core: TorchCore,
    mode: str,
    batch_prompts: list[dict[str, list[int]]],
    params: SamplingParams,
    reference: dict[str, list[int]],
    num_speculative_tokens: int,
    ngram: NgramDrafter,
) -> _Run:
    """One mode over `batch_prompts` (each dict a batch submitted at once), as one run."""
    drafter: Drafter | None = None
    if mode == "ngram":
        drafter = ngram
    elif mode == "oracle":
        drafter = OracleDrafter(reference, num_speculative_tokens)
    core.set_drafter(drafter, async_scheduling=mode == "baseline_async")
    runs = [_run(core, prompts, params, f"{mode}-{i}") for i, prompts in enumerate(batch_prompts)]
    outputs = {k: v for r in runs for k, v in r.outputs.items()}
    stats = EngineStats()
    for field in dataclasses.fields(stats):
        setattr(stats, field.name, sum(getattr(r.stats, field.name) for r in runs))
    return _Run(
        outputs,
        sum(r.seconds for r in runs),
        sum(r.decode_seconds for r in runs),
        stats,
    )


def speculation_report(
    core: TorchCore,
    prompts: list[list[int]],
    *,
    prompt_kind: str,
    batches: list[int],
    single_stream_prompts: int,
    max_tokens: int,
    rounds: int,
) -> dict[str, Any]:
    """Every mode at every batch size, in one run; each row is the median of `rounds` runs
    (modes alternate within a round)."""
    drafter = core.scheduler.drafter
    assert isinstance(drafter, NgramDrafter), "build the core with speculate='ngram'"
    k = drafter.num_speculative_tokens
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    modes = list(MODES)
    if not getattr(core.executor, "launches_ahead", False):
        modes.remove("baseline_async")  # async pays only where the device runs ahead (a GPU)
    report: dict[str, Any] = {
        **engine_header(core),
        "prompts": prompt_kind,
        "prompt_tokens_mean": statistics.mean(len(p) for p in prompts),
        "max_tokens": max_tokens,
        "num_speculative_tokens": k,
        "ngram_max": drafter.ngram_max,
        "ngram_min": drafter.ngram_min,
        "rounds": rounds,
        "modes": modes,
        "oracle_note": "upper bound: drafts are the baseline run's own greedy output",
        "batches": {},
        "speedups": {},
    }
    # Warm-up: one short request per mode (kernels for verify shapes compile on first use).
    warm = SamplingParams(max_tokens=8, temperature=0.0)
    for mode in modes:
        _mode_runs(core, mode, [{"w": prompts[0]}], warm, {"w": []}, k, drafter)
    for batch in batches:
        if batch == 1:
            batch_prompts = [{str(i): p} for i, p in enumerate(prompts[:single_stream_prompts])]
        else:
            batch_prompts = [{str(i): p for i, p in enumerate(prompts[:batch])}]
        keys = [k for b in batch_prompts for k in b]
        core.set_drafter(None)
        reference = _mode_runs(core, "baseline", batch_prompts, params, {}, k, drafter).outputs
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                run = _mode_runs(core, mode, batch_prompts, params, reference, k, drafter)
                rows[mode].append(_summary(run, {key: reference[key] for key in keys}))
        medians = {mode: _median_row(r) for mode, r in rows.items()}
        report["batches"][str(batch)] = {"requests": len(keys), "modes": medians}
        speedups: dict[str, float] = {}
        for mode in ("ngram", "oracle"):
            for base in ("baseline", "baseline_async"):
                if base in medians:
                    for rate in ("tokens_per_s", "decode_tokens_per_s"):
                        ours, theirs = medians[mode][rate], medians[base][rate]
                        if ours and theirs:
                            speedups[f"{mode}_vs_{base}_{rate}"] = ours / theirs
        report["speedups"][str(batch)] = speedups
    core.set_drafter(drafter)
    return report


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each timing the median over rounds; counts from the first round (they do not change)."""
    out = dict(rows[0])
    for key in ("seconds", "tokens_per_s", "decode_seconds", "decode_tokens_per_s"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out
