"""Reports: the summary table, several results side by side, and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from kvmesh.bench.load.config import BenchConfig, Slo
from kvmesh.bench.load.metrics import BenchResult, RequestRecord, summarize
from kvmesh.bench.load.report import render_comparison, render_summary, write_json


def result(*, ttft: float, slo: Slo | None = None, error: str | None = None) -> BenchResult:
    slo = slo or Slo()
    records = [
        RequestRecord(
            index=i,
            session=i,
            turn=0,
            group=i % 2,
            prompt_len=10,
            max_tokens=2,
            sent_s=i * 0.1,
            chunk_offsets_s=[ttft, ttft + 0.01],
            chunk_tokens=[1, 1],
            e2e_s=ttft + 0.02,
            prompt_tokens=10,
            completion_tokens=2,
            cached_tokens=5,
        )
        for i in range(3)
    ]
    records[-1].error = error
    config = BenchConfig(target="http://h:1", slo=slo, num_requests=3)
    summary = summarize(records, duration_s=1.0, slo=slo)
    return BenchResult(config, "m", "http://h:1", summary, records)


def value(table: str, label: str) -> str:
    line = next(line for line in table.splitlines() if line.startswith(f"{label}  "))
    return line.removeprefix(label).strip()


def test_the_summary_names_the_run_and_lists_the_metrics_and_errors() -> None:
    text = render_summary(result(ttft=0.05, error="HTTP 503: busy"))
    assert "target     http://h:1" in text
    assert "workload   shared-prefix (groups=64" in text
    assert "arrivals   poisson, 1 req/s, seed 0" in text
    assert value(text, "successful requests") == "2"
    assert value(text, "failed requests") == "1"
    assert value(text, "TTFT p50 (ms)") == "50.00"
    assert value(text, "prefix hit rate") == "50.0 %"
    assert "1 x HTTP 503: busy" in text
    assert "goodput" not in text


def test_goodput_rows_appear_with_slos() -> None:
    text = render_summary(result(ttft=0.05, slo=Slo(ttft_ms=100)))
    assert value(text, "goodput (req/s)") == "3.00"
    assert value(text, "requests meeting SLOs") == "100.0 %"


def test_a_comparison_has_a_column_per_named_result() -> None:
    text = render_comparison({"least-load": result(ttft=0.2), "cache-aware": result(ttft=0.05)})
    header, *rows = text.splitlines()
    assert header.split() == ["least-load", "cache-aware"]
    ttft = next(r for r in rows if r.startswith("TTFT p50 (ms)"))
    assert ttft.split()[-2:] == ["200.00", "50.00"]
    assert len({len(r) for r in [header, *rows]}) == 1  # aligned columns


def test_json_holds_summary_records_and_config(tmp_path: Path) -> None:
    path = tmp_path / "out" / "bench.json"
    write_json(result(ttft=0.05), path)
    written = json.loads(path.read_text())
    assert written["model"] == "m"
    assert written["summary"]["num_ok"] == 3
    assert written["summary"]["ttft_ms"]["p50"] == 50.0
    assert written["config"]["num_requests"] == 3
    assert written["config"]["workload"]["name"] == "shared-prefix"
    assert len(written["requests"]) == 3
    first = written["requests"][0]
    assert first["ttft_s"] == 0.05 and first["hit_rate"] == 0.5 and first["group"] == 0
