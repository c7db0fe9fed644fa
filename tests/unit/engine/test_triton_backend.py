"""The triton backend and the fused ops wired into the model, on Triton's CPU interpreter.

The kernels themselves are checked one by one in test_triton_kernels.py; this runs the whole
engine on them (rotary + KV write, fused norms, SiLU-mul, split-KV decode, prefill over a
cached prefix) and asks for exactly the sdpa backend's greedy tokens. Float32: the
interpreter's bf16 is not faithful (see triton_interpreter.py), and in float32 rounding cannot
flip a greedy token. CUDA graphs are GPU-only (tests/gpu).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

import kvmesh.engine.kernels as kernels_package
from kvmesh.engine import EngineConfig, torch_engine
from kvmesh.engine.attention import AttentionBackend, resolve_backend, triton_backend
from kvmesh.engine.torch_engine import TorchCore
from kvmesh.sampling import SamplingParams
from tests.helpers import generate
from tests.unit.engine.triton_interpreter import interpreted_kernels


@pytest.fixture(scope="module")
def interpreted() -> Iterator[None]:
    """The triton backend on interpreted kernels, on the CPU."""
    with interpreted_kernels() as k, pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_backend, "paged_decode_attention", k.decode.paged_decode_attention)
        patch.setattr(triton_backend, "paged_prefill_attention", k.prefill.paged_prefill_attention)
        for name in ("fused", "rope"):
            module = getattr(k, name)
            patch.setattr(kernels_package, name, module, raising=False)
            patch.setitem(sys.modules, f"kvmesh.engine.kernels.{name}", module)

        def backend(name: str, device: torch.device) -> AttentionBackend:
            if name == "triton":
                return triton_backend.TritonBackend(device, num_sms=4)
            return resolve_backend(name, device)

        patch.setattr(torch_engine, "resolve_backend", backend)
        yield


def _prompts() -> list[list[int]]:
    rng = torch.Generator().manual_seed(3)
    shared = torch.randint(10, 200, (24,), generator=rng).tolist()
    with_prefix = [shared + torch.randint(10, 200, (n,), generator=rng).tolist() for n in (3, 9)]
    alone = [torch.randint(10, 200, (n,), generator=rng).tolist() for n in (1, 4, 5, 30)]
    return with_prefix + alone


@pytest.mark.usefixtures("interpreted")
def test_triton_backend_gives_the_sdpa_backend_greedy_tokens() -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("sdpa", "triton"):
        config = EngineConfig(
            model="dummy:llama-tiny",
            device="cpu",
            dtype="float32",
            block_size=4,
            num_blocks=128,
            max_num_batched_tokens=16,  # the 30-token prompt and the prefixed ones are chunked
            attention_backend=backend,
        )
        core = TorchCore(config, show_progress=False)
        assert core.info.attention_backend == backend
        prompts = _prompts()
        generate(core, prompts[:1], params)  # its prompt is then cached: a prefix hit next
        results[backend] = generate(core, prompts, params)
        assert core.stats.num_prefix_hit_tokens > 0
        assert core.is_idle_and_whole()
    assert results["triton"] == results["sdpa"]


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
# Padding rows carry uninitialized attention outputs, which numpy (under the interpreter) may
# overflow on; rows never mix, and only real rows' logits are read.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_the_graphs_padded_buffers_give_the_sdpa_backend_greedy_tokens(
    async_scheduling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CUDA graph replays, run eagerly: decode steps padded to their batch bucket, and
    single-prompt steps padded to their prefill bucket over fixed buffers (capture itself is
    GPU-only). Ragged decodes, chunks over a cached prefix, pending tokens fed on the device."""
    from kvmesh.engine import cuda_graphs

    replayed: list[tuple[str, int]] = []

    def replay(self: cuda_graphs._Graphs, bucket: int) -> torch.Tensor:
        replayed.append((self.kind, bucket))
        return self._forward(bucket)

    monkeypatch.setattr(cuda_graphs._Graphs, "_replay", replay)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("sdpa", "triton"):
        config = EngineConfig(
            model="dummy:llama-tiny",
            device="cpu",
            dtype="float32",
            block_size=4,
            num_blocks=128,
            max_num_batched_tokens=16,
            max_num_seqs=8,
            attention_backend=backend,
            async_scheduling=async_scheduling,
        )
        core = TorchCore(config, show_progress=False)
        if backend == "triton":
            runner = core.runner
            assert isinstance(runner.attention, triton_backend.TritonBackend)
            runner.graphs = cuda_graphs.DecodeGraphs(
                core.model, core.kv_cache, runner.attention, max_batch=8, max_model_len=128
            )
            runner.prefill_graphs = cuda_graphs.PrefillGraphs(
                core.model, core.kv_cache, max_tokens=16, max_model_len=128
            )
            for graphs in (runner.graphs, runner.prefill_graphs):
                graphs._graphs = dict.fromkeys(graphs._buckets)  # type: ignore[arg-type]
        prompts = _prompts()
        generate(core, prompts[:1], params)
        results[backend] = generate(core, prompts, params)
        assert core.is_idle_and_whole()
    assert results["triton"] == results["sdpa"]
    kinds = {kind for kind, _ in replayed}
    assert kinds == {"decode", "prefill"}, replayed
