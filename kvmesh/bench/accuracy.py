"""How closely the engine follows transformers given the same weights (`kvmesh check-accuracy`).

Greedy tokens are compared with transformers' own `generate`. Logits are compared teacher-forced:
both models read the same sequence (prompt plus transformers' greedy continuation) and every
position's logits are compared. In bf16 two correct implementations differ by rounding, so the
report also measures each against a float32 run of the same weights: the engine is as accurate
as transformers when its error against float32 is no larger than transformers' own.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvmesh.bench.reference import (
    engine_logits,
    reference_logits,
    transformers_greedy,
    transformers_model,
)
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, TokenOutput


@dataclass(slots=True)
class AccuracyReport:
    model: str
    device: str
    dtype: str
    num_prompts: int
    greedy_tokens: int
    greedy_matches: int  # prompts whose first `greedy_tokens` tokens equal transformers'
    mismatched_prompts: list[int]
    first_step_max_abs_diff: float  # logits of the first generated token, worst prompt
    teacher_forced_max_abs_diff: float
    teacher_forced_mean_abs_diff: float
    teacher_forced_top1_agreement: float  # positions whose argmax agrees
    engine_vs_fp32_max_abs_diff: float | None = None
    transformers_vs_fp32_max_abs_diff: float | None = None
    engine_vs_fp32_mean_abs_diff: float | None = None
    transformers_vs_fp32_mean_abs_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_greedy(
    core: TorchCore, prompt: list[int], max_tokens: int, request_id: str
) -> list[int]:
    core.add(GenerateRequest(request_id, tuple(prompt), SamplingParams(max_tokens, 0.0)))
    tokens: list[int] = []
    while core.has_work:
        for out in core.step():
            if isinstance(out, TokenOutput) and out.request_id == request_id:
                tokens += out.token_ids
    return tokens


def check_accuracy(
    core: TorchCore,
    prompts: list[list[int]],
    *,
    greedy_tokens: int = 32,
    fp32_reference: bool = False,
) -> AccuracyReport:
    model = transformers_model(core)
    fp32 = copy.deepcopy(model).float() if fp32_reference else None
    matches, mismatched = 0, []
    first_step, tf_max, tf_sum, tf_count, top1 = 0.0, 0.0, 0.0, 0, 0
    e32_max = t32_max = e32_sum = t32_sum = 0.0
    for i, prompt in enumerate(prompts):
        theirs = transformers_greedy(model, prompt, greedy_tokens)
        ours = engine_greedy(core, prompt, greedy_tokens, f"accuracy-{i}")
        if ours[:greedy_tokens] == theirs[:greedy_tokens]:
            matches += 1
        else:
            mismatched.append(i)
        sequence = prompt + theirs[:-1] if len(theirs) > 1 else prompt
        # The continuation runs as a second step over the cached prompt: the prefix-hit path.
        ours_logits = engine_logits(core, sequence, split=len(prompt))[len(prompt) - 1 :]
        theirs_logits = reference_logits(core, sequence, model)[len(prompt) - 1 :]
        diff = (ours_logits - theirs_logits).abs()
        first_step = max(first_step, diff[0].max().item())
        tf_max = max(tf_max, diff.max().item())
        tf_sum += diff.mean(dim=-1).sum().item()
        tf_count += diff.shape[0]
        top1 += int((ours_logits.argmax(-1) == theirs_logits.argmax(-1)).sum().item())
        if fp32 is not None:
            exact = reference_logits(core, sequence, fp32)[len(prompt) - 1 :]
            e32, t32 = (ours_logits - exact).abs(), (theirs_logits - exact).abs()
            e32_max, t32_max = max(e32_max, e32.max().item()), max(t32_max, t32.max().item())
            e32_sum += e32.mean(dim=-1).sum().item()
            t32_sum += t32.mean(dim=-1).sum().item()
    report = AccuracyReport(
        model=core.info.model_id,
        device=core.info.device,
        dtype=core.info.dtype,
        num_prompts=len(prompts),
        greedy_tokens=greedy_tokens,
        greedy_matches=matches,
        mismatched_prompts=mismatched,
        first_step_max_abs_diff=first_step,
        teacher_forced_max_abs_diff=tf_max,
        teacher_forced_mean_abs_diff=tf_sum / max(tf_count, 1),
        teacher_forced_top1_agreement=top1 / max(tf_count, 1),
    )
    if fp32 is not None:
        report.engine_vs_fp32_max_abs_diff = e32_max
        report.transformers_vs_fp32_max_abs_diff = t32_max
        report.engine_vs_fp32_mean_abs_diff = e32_sum / max(tf_count, 1)
        report.transformers_vs_fp32_mean_abs_diff = t32_sum / max(tf_count, 1)
    del model, fp32
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report
