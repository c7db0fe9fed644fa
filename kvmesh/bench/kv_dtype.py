"""How much FP8 KV changes what the model says: the FP8 transfer path and the FP8 cache, each
against the model's own KV dtype (float32 on CPU, bfloat16 on a GPU), on the same prompts.

For each prompt the reference engine decodes `max_tokens` greedy tokens; then, teacher-forced on
that continuation, every decode position's next-token distribution is compared (KL divergence
of the FP8 path from the reference, and whether the argmax agrees):

- `transfer` (`--transfer-dtype fp8_e4m3`): the prompt is prefilled by a prefill-only request,
  exported through the FP8 export pool (`kvmesh.engine.exports`), converted on import into the
  engine's own cache (`kvmesh.kv.convert`), and decoded there: the prompt's KV went through
  FP8 once, the decoded tokens' KV did not. The greedy continuation of that import, through
  `reserve_import` and `start_import`, is compared token by token as well.
- `cache` (`--kv-dtype fp8_e4m3`): every token's KV is stored in FP8 (sdpa/paged backends).

    python -m kvmesh.bench.kv_dtype --prompts 20 --max-tokens 32 --json-out report.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import torch

from kvmesh.bench.accuracy import engine_greedy
from kvmesh.bench.prompts import chat_prompt_ids
from kvmesh.bench.reference import engine_logits
from kvmesh.engine.attention.common import SequenceSlice
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.kv.cache import KvLayout
from kvmesh.kv.convert import read_raw_blocks, tokens_of, write_converted
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, PrefillOutput, TokenOutput


@dataclass(slots=True)
class PathReport:
    """One FP8 path against the reference, over every prompt's decode positions."""

    mean_kl: float
    max_kl: float
    top1_agreement: float  # teacher-forced: positions whose argmax is the reference's token
    greedy_token_agreement: float | None  # free-running: tokens equal to the reference's
    positions: int


@dataclass(slots=True)
class KvDtypeReport:
    model: str
    device: str
    reference_kv_dtype: str
    transfer_dtype: str
    num_prompts: int
    max_tokens: int
    transfer: PathReport
    cache: PathReport | None
    transfer_bytes_per_block: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of logits."""
    p = torch.log_softmax(reference.float(), -1)
    q = torch.log_softmax(other.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def _decode_logits_over_import(
    core: TorchCore, prompt: list[int], continuation: list[int]
) -> torch.Tensor:
    """Logits predicting `continuation[1:]`, decoding over the prompt's KV as it arrives
    through the FP8 export pool and the conversion on import."""
    assert core.exports is not None
    exported = _prefill_export(core, prompt, "kl")
    blocks = core.pool.allocate(-(-(len(prompt) + len(continuation)) // core.block_size))
    try:
        _import_into(core, exported, blocks, len(prompt))
        core.release_export("kl")
        start, end = len(prompt), len(prompt) + len(continuation) - 1
        meta = core.model.attention.build(
            [_slice(end - start, start, blocks)], core.block_size, core.model.device
        )
        return core.model.forward(
            torch.tensor(continuation[:-1], device=core.model.device),
            torch.arange(start, end, device=core.model.device),
            meta,
            core.kv_cache,
            None,
        )
    finally:
        core.pool.release(blocks)


def _slice(num_query: int, before: int, blocks: Sequence[int]) -> SequenceSlice:
    return SequenceSlice(num_query, before, blocks)


def _prefill_export(core: TorchCore, prompt: list[int], request_id: str) -> list[int]:
    """A prefill-only request's export: its block ids in the export pool."""
    params = SamplingParams(2, 0.0, ignore_eos=True)  # a first token that ends it exports nothing
    core.add(GenerateRequest(request_id, tuple(prompt), params), prefill_only=True)
    export = None
    while core.has_work:
        for out in core.step():
            if isinstance(out, PrefillOutput):
                export = out.export
    assert export is not None, "the first token ended the request: nothing exported"
    return list(export.block_ids)


def _import_into(
    core: TorchCore, exported: Sequence[int], blocks: Sequence[int], num_tokens: int
) -> None:
    """What the transfer agent does on a decode worker, without NIXL in between: the export's
    bytes as they are, converted into `blocks` of the engine's cache."""
    assert core.exports is not None
    source: KvLayout = core.exports.cache.layout
    raw = core.exports.cache.tensor[torch.as_tensor(exported, device=core.model.device)]
    values = read_raw_blocks(raw.view(torch.uint8).view(len(exported), -1), source)
    write_converted(core.kv_cache, list(blocks), 0, tokens_of(values, 0, num_tokens))


def _greedy_over_import(core: TorchCore, prompt: list[int], max_tokens: int) -> list[int]:
    """The engine's own import path: reserve, fill (converted from FP8), start, decode."""
    assert core.exports is not None
    request = GenerateRequest("imp", tuple(prompt), SamplingParams(max_tokens, 0.0))
    core.add(replace(request, request_id="exp"), prefill_only=True)
    result = None
    while core.has_work:
        for out in core.step():
            if isinstance(out, PrefillOutput):
                result = out
    assert result is not None and result.export is not None
    plan = core.reserve_import(request, replace(result.export, request_id="imp"))
    _import_into(core, list(result.export.block_ids), list(plan.block_ids), len(prompt))
    core.release_export("exp")
    first = result.first.token_ids[0]
    tokens = [first]
    final = core.start_import("imp", first)
    if final is not None:
        return tokens
    while core.has_work:
        for out in core.step():
            if isinstance(out, TokenOutput) and out.request_id == "imp":
                tokens += out.token_ids
    return tokens


def measure(
    *,
    model: str,
    device: str,
    num_prompts: int,
    max_tokens: int,
    with_cache: bool,
    transfer_dtype: str = "fp8_e4m3",
) -> KvDtypeReport:
    base = EngineConfig(
        model=model,
        device=device,
        attention_backend="sdpa",
        enable_prefix_cache=False,
        kv_cache_bytes=256 << 20,
        cuda_graphs=False,
    )
    core = TorchCore(replace(base, transfer_dtype=transfer_dtype), show_progress=False)
    assert core.exports is not None
    cached = (
        TorchCore(replace(base, kv_dtype="fp8_e4m3"), show_progress=False) if with_cache else None
    )
    prompts = chat_prompt_ids(core, num_prompts)
    kl: dict[str, list[torch.Tensor]] = {"transfer": [], "cache": []}
    top1: dict[str, list[torch.Tensor]] = {"transfer": [], "cache": []}
    greedy_equal = greedy_total = 0
    for i, prompt in enumerate(prompts):
        continuation = engine_greedy(core, prompt, max_tokens, f"ref-{i}")
        sequence = prompt + continuation
        n = len(prompt)
        reference = engine_logits(core, sequence)[n : len(sequence) - 1]  # predict cont[1:]
        targets = torch.tensor(continuation[1:], device=reference.device)
        transferred = _decode_logits_over_import(core, prompt, continuation)
        kl["transfer"].append(_kl(reference, transferred).cpu())
        top1["transfer"].append((transferred.argmax(-1) == targets).cpu())
        imported = _greedy_over_import(core, prompt, max_tokens)
        greedy_equal += sum(a == b for a, b in zip(imported, continuation, strict=False))
        greedy_total += len(continuation)
        if cached is not None:
            fp8 = engine_logits(cached, sequence, split=n)[n : len(sequence) - 1]
            kl["cache"].append(_kl(reference, fp8).cpu())
            top1["cache"].append((fp8.argmax(-1) == targets).cpu())

    def path(name: str, greedy: float | None) -> PathReport:
        values, agree = torch.cat(kl[name]), torch.cat(top1[name])
        return PathReport(
            mean_kl=float(values.mean()),
            max_kl=float(values.max()),
            top1_agreement=float(agree.float().mean()),
            greedy_token_agreement=greedy,
            positions=int(values.numel()),
        )

    layout = core.kv_cache.layout
    return KvDtypeReport(
        model=model,
        device=str(core.model.device),
        reference_kv_dtype=core.info.kv_dtype,
        transfer_dtype=transfer_dtype,
        num_prompts=num_prompts,
        max_tokens=max_tokens,
        transfer=path("transfer", greedy_equal / max(greedy_total, 1)),
        cache=path("cache", None) if cached is not None else None,
        transfer_bytes_per_block={
            core.info.kv_dtype: layout.bytes_per_block,
            transfer_dtype: core.exports.cache.layout.bytes_per_block,
        },
    )


@click.command()
@click.option("--model", default="smollm2", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--prompts", "num_prompts", default=20, show_default=True)
@click.option("--max-tokens", default=32, show_default=True)
@click.option(
    "--cache/--no-cache",
    "with_cache",
    default=True,
    show_default=True,
    help="also measure an FP8 KV cache (--kv-dtype fp8_e4m3)",
)
@click.option(
    "--transfer-dtype",
    type=click.Choice(["fp8_e4m3", "bfloat16", "float16"]),
    default="fp8_e4m3",
    show_default=True,
    help="the dtype of the transfer path (bfloat16: what rounding to 16 bits alone does)",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(
    model: str,
    device: str,
    num_prompts: int,
    max_tokens: int,
    with_cache: bool,
    transfer_dtype: str,
    json_out: Path | None,
) -> None:
    """FP8 KV against the model's KV dtype: next-token KL and greedy agreement."""
    report = measure(
        model=model,
        device=device,
        num_prompts=num_prompts,
        max_tokens=max_tokens,
        with_cache=with_cache,
        transfer_dtype=transfer_dtype,
    )
    text = json.dumps(report.as_dict(), indent=2)
    click.echo(text)
    if json_out is not None:
        json_out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
