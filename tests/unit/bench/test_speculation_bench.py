"""`kvmesh bench-speculation` on the tiny dummy model: every mode at every batch, the oracle's
drafts all accepted, the speculative modes' tokens those of the baseline."""

from __future__ import annotations

from kvmesh.bench.speculation import speculation_report, workload_prompts
from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchCore


def test_the_report_has_every_mode_and_the_oracle_is_always_right() -> None:
    config = EngineConfig(
        model="dummy:llama-tiny",
        device="cpu",
        block_size=4,
        num_blocks=256,
        speculate="ngram",
        enable_prefix_cache=False,
    )
    core = TorchCore(config, show_progress=False)
    prompts = workload_prompts(core, 3, 40, seed=0)
    assert [len(p) for p in prompts] == [40, 40, 40]
    report = speculation_report(
        core,
        prompts,
        prompt_kind="workload",
        batches=[1, 3],
        single_stream_prompts=2,
        max_tokens=12,
        rounds=1,
    )
    assert report["modes"] == ["baseline", "ngram", "oracle"]  # no async baseline on a CPU
    for batch, requests in (("1", 2), ("3", 3)):
        rows = report["batches"][batch]["modes"]
        assert report["batches"][batch]["requests"] == requests
        for row in rows.values():
            assert row["generated_tokens"] == 12 * requests
            assert row["requests_differing_from_baseline"] == 0
        assert rows["baseline"]["draft_tokens"] == 0
        assert rows["oracle"]["acceptance_rate"] == 1.0
        assert rows["oracle"]["steps"] < rows["baseline"]["steps"]
        assert "oracle_vs_baseline_decode_tokens_per_s" in report["speedups"][batch]
    assert core.is_idle_and_whole()
