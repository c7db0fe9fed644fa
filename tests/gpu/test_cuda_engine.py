"""The same engine code on CUDA in bf16 (run on a GPU machine: pytest -m gpu).

Tolerance for bf16: two correct bf16 implementations differ by rounding (bf16 keeps 8 bits of
mantissa, about 0.4% per operation, compounded over every layer), so a fixed logit tolerance
would be either meaningless or arbitrary. The test instead measures both the engine and
transformers against a float32 run of the same weights: the engine passes when its error is no
more than 1.5x transformers' own bf16 error, in the worst case and on average.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from kvmesh import models
from kvmesh.bench.accuracy import check_accuracy
from kvmesh.bench.prompts import chat_prompt_ids
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.errors import ModelNotFoundError
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest
from tests.helpers import generate, run_until_idle, tokens_by_request

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA; run on a GPU machine with pytest -m gpu"
)


def _smollm2_spec() -> tuple[str, bool]:
    """The real SmolLM2 weights where present (KVMESH_GPU_MODEL or the package), else dummy."""
    spec = os.environ.get("KVMESH_GPU_MODEL", "smollm2")
    try:
        models.resolve(spec)
    except ModelNotFoundError:
        return "dummy:smollm2-135m", False
    return spec, True


def _report(name: str, data: dict[str, object]) -> None:
    directory = os.environ.get("KVMESH_REPORT_DIR")
    if directory:
        Path(directory, f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def _free(core: TorchCore) -> None:
    del core
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["sdpa", "paged", "triton"])
def test_bf16_logits_and_greedy_tokens_agree_with_transformers(backend: str) -> None:
    spec, real = _smollm2_spec()
    config = EngineConfig(model=spec, device="cuda", num_blocks=4096, attention_backend=backend)
    core = TorchCore(config, show_progress=False)
    core.warm_up()
    assert core.info.dtype == "bfloat16"
    assert core.info.attention_backend == backend
    report = check_accuracy(core, chat_prompt_ids(core, 20), greedy_tokens=16, fp32_reference=True)
    _report(f"gpu_accuracy_{backend}", {"real_weights": real, **report.as_dict()})
    assert report.engine_vs_fp32_max_abs_diff is not None
    assert report.transformers_vs_fp32_max_abs_diff is not None
    assert report.engine_vs_fp32_mean_abs_diff is not None
    assert report.transformers_vs_fp32_mean_abs_diff is not None
    assert report.engine_vs_fp32_max_abs_diff <= 1.5 * report.transformers_vs_fp32_max_abs_diff
    assert report.engine_vs_fp32_mean_abs_diff <= 1.5 * report.transformers_vs_fp32_mean_abs_diff
    if real:
        assert report.greedy_matches >= 16, report.mismatched_prompts
    assert core.is_idle_and_whole()
    _free(core)


def test_disaggregated_copy_on_cuda_gives_the_same_tokens() -> None:
    config = EngineConfig(model="dummy:llama-tiny", device="cuda", block_size=16, num_blocks=64)
    prefill, decode = (
        TorchCore(config, show_progress=False),
        TorchCore(config, show_progress=False),
    )
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 60))
    expected = generate(prefill, [prompt], params)[0]
    request = GenerateRequest("cuda-split", tuple(prompt), params)
    prefill.add(request, prefill_only=True)
    (result,) = run_until_idle(prefill)
    assert result.export is not None  # type: ignore[union-attr]
    plan = decode.reserve_import(request, result.export)  # type: ignore[union-attr]
    source = result.export.block_ids[plan.num_cached_blocks :]  # type: ignore[union-attr]
    decode.kv_cache.write_blocks(plan.blocks_to_fill, prefill.kv_cache.read_blocks(source))
    prefill.release_export("cuda-split")
    first = result.first.token_ids[0]  # type: ignore[union-attr]
    decode.start_import("cuda-split", first)
    tokens = [first, *tokens_by_request(run_until_idle(decode))["cuda-split"]]
    assert tokens == expected
    assert prefill.is_idle_and_whole() and decode.is_idle_and_whole()


def test_llama_8b_shaped_model_runs_32_concurrent_decodes() -> None:
    core = TorchCore(
        EngineConfig(model="dummy:llama-3.1-8b", device="cuda", max_num_seqs=64),
        show_progress=False,
    )
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    prompts = chat_prompt_ids(core, 32)
    for i, prompt in enumerate(prompts):
        core.add(GenerateRequest(f"big-{i}", tuple(prompt), params))
    most_running = 0
    outputs = []
    while core.has_work:
        outputs += core.step()
        most_running = max(most_running, core.load().num_running)
    tokens = tokens_by_request(outputs)
    assert most_running == 32
    assert sorted(len(t) for t in tokens.values()) == [48] * 32
    assert core.is_idle_and_whole()
    _report("gpu_8b_concurrency", {"sequences": 32, "most_running": most_running})
    _free(core)


def test_triton_backend_gives_the_sdpa_backend_tokens_in_float32() -> None:
    """Ragged batch, prefix hits and chunked prefill through the kernels and the CUDA graphs:
    the same greedy tokens as the sdpa backend (float32, where rounding cannot flip a token)."""
    rng = torch.Generator().manual_seed(3)
    shared = torch.randint(10, 200, (48,), generator=rng).tolist()
    prompts = [shared + torch.randint(10, 200, (n,), generator=rng).tolist() for n in (3, 17, 40)]
    prompts += [torch.randint(10, 200, (n,), generator=rng).tolist() for n in (1, 15, 16, 70)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("sdpa", "triton"):
        config = EngineConfig(
            model="dummy:llama-tiny",
            device="cuda",
            dtype="float32",
            block_size=16,
            num_blocks=256,
            max_num_batched_tokens=32,  # long prompts are chunked
            attention_backend=backend,
        )
        core = TorchCore(config, show_progress=False)
        core.warm_up()
        results[backend] = generate(core, prompts, params)
        assert core.info.cuda_graphs == (backend == "triton")
        assert core.stats.num_prefix_hit_tokens > 0
        assert core.is_idle_and_whole()
        _free(core)
    assert results["triton"] == results["sdpa"]


def test_cuda_graph_replay_equals_eager_execution_bitwise() -> None:
    """Decode graphs on a ragged batch, and a prefill graph on a padded chunk."""
    from kvmesh.engine.attention.common import SequenceSlice

    config = EngineConfig(model="dummy:smollm2-135m", device="cuda", num_blocks=1024)
    core = TorchCore(config, show_progress=False)
    core.warm_up()
    graphs = core.runner.graphs
    assert graphs is not None
    rng = torch.Generator().manual_seed(5)
    lens = [int(n) for n in torch.randint(1, 700, (7,), generator=rng)]
    blocks = [core.pool.allocate(-(-(n + 1) // 16)) for n in lens]
    # Real K/V in the cache for every context.
    core.kv_cache.tensor.normal_(0, 1, generator=torch.Generator("cuda").manual_seed(1))
    slices = [SequenceSlice(1, n, b) for n, b in zip(lens, blocks, strict=True)]
    ids = torch.randint(10, 1000, (7,), generator=rng).tolist()
    replayed = graphs.run(ids, lens, slices).clone()
    eager = graphs.eager(ids, lens, slices)
    assert torch.equal(replayed, eager)
    # A prompt's chunk over a cached prefix, padded to its prefill bucket (300 -> 320).
    prefill = core.runner.prefill_graphs
    assert prefill is not None
    chunk = SequenceSlice(300, 400, blocks[0] + core.pool.allocate(44))
    chunk_ids = torch.randint(10, 1000, (300,), generator=rng).tolist()
    positions = list(range(400, 700))
    replayed = prefill.run(chunk_ids, positions, chunk).clone()
    assert torch.equal(replayed, prefill.eager(chunk_ids, positions, chunk))
    for b in blocks:
        core.pool.release(b)
    core.pool.release(chunk.block_ids[len(blocks[0]) :])
    _free(core)


def test_async_scheduling_gives_the_synchronous_tokens() -> None:
    """Steps launched before the previous one is read (pending tokens fed on the device, into
    CUDA graphs and eager steps alike): the same tokens as synchronous steps, for requests that
    end by length, by a stop token, by EOS, and that sample with a seed (float32, where a batch
    one sequence larger cannot flip a token)."""
    rng = torch.Generator().manual_seed(4)
    shared = torch.randint(10, 200, (40,), generator=rng).tolist()
    prompts = [shared + torch.randint(10, 200, (n,), generator=rng).tolist() for n in (2, 9, 33)]
    prompts += [torch.randint(10, 200, (n,), generator=rng).tolist() for n in (1, 15, 16, 70)]
    kinds = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=tuple(range(10, 200, 9))),
        SamplingParams(max_tokens=24, temperature=0.0),  # EOS set below
        SamplingParams(max_tokens=24, temperature=0.8, seed=7, logprobs=True, top_logprobs=2),
    ]
    results = {}
    for mode in (False, True):
        config = EngineConfig(
            model="dummy:llama-tiny",
            device="cuda",
            dtype="float32",
            block_size=16,
            num_blocks=256,
            max_num_batched_tokens=32,
            async_scheduling=mode,
        )
        core = TorchCore(config, show_progress=False)
        core.warm_up()
        assert core.async_scheduling == mode and core.info.cuda_graphs
        core.eos_token_ids = frozenset(range(100, 110))
        for i, prompt in enumerate(prompts * 2):
            core.add(GenerateRequest(f"r{i}", tuple(prompt), kinds[i % len(kinds)]))
        results[mode] = tokens_by_request(run_until_idle(core))
        assert core.is_idle_and_whole()
        _free(core)
    assert results[True] == results[False]


def test_speculative_decoding_gives_the_plain_tokens_through_the_kernels() -> None:
    """N-gram drafts verified through the triton prefill kernel (a chunk that starts at a
    sequence's last token, over its paged KV), mixed with decode rows and chunked prefills, and
    steps without drafts through the decode graphs: the same greedy tokens as plain decoding
    (float32), with drafts accepted, and every block back in the pool."""
    rng = torch.Generator().manual_seed(6)
    phrases = [torch.randint(3, 60, (n,), generator=rng).tolist() for n in (2, 3, 5, 7, 4, 6)]
    prompts = [p * r for p, r in zip(phrases, (9, 5, 4, 3, 12, 6), strict=True)]
    prompts += [torch.randint(10, 200, (n,), generator=rng).tolist() for n in (1, 15, 70)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    results = {}
    for speculate in (None, "ngram"):
        config = EngineConfig(
            model="dummy:llama-tiny",
            device="cuda",
            dtype="float32",
            block_size=16,
            num_blocks=256,
            max_num_batched_tokens=32,
            attention_backend="triton",
            speculate=speculate,
        )
        core = TorchCore(config, show_progress=False)
        core.warm_up()
        results[speculate] = generate(core, prompts, params)
        assert core.info.cuda_graphs
        if speculate:
            assert not core.async_scheduling
            assert core.stats.num_spec_accepted_tokens > 0
        assert core.is_idle_and_whole()
        _free(core)
    assert results["ngram"] == results[None]
