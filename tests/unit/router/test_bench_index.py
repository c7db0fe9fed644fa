"""The router cost benchmark runs small and its boundedness check means what it says."""

from __future__ import annotations

from services.router.bench_index import run


def test_small_run_reports_hits_costs_and_a_bounded_index() -> None:
    report = run(prefixes=200, prefix_tokens=64, workers=4, decisions=100, capacity_blocks=300,
                 churn=400)  # fmt: skip
    assert report["index_entries"] == 200 * 4  # 4 blocks per prefix, one holder each
    assert report["decision_hit_fraction"] == 0.9  # one in ten prompts is a miss by design
    assert 0 < report["decision_us_p50"] <= report["decision_us_p99"]
    bounded = report["bounded"]
    assert bounded["index_equals_caches"]
    assert bounded["within_capacity"]
    assert bounded["final_entries"] <= 4 * 300
