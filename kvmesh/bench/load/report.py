"""Results for people and for files: a summary table, a side-by-side table, JSON.

`render_comparison({"least-load": a, "cache-aware": b})` puts several runs in one table, one
column each, with the same rows as a single run's summary, so results read the same way
whether one system was measured or several.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from kvmesh.bench.load.metrics import BenchResult, Stats, Summary

MAX_ERRORS_SHOWN = 5

Row = tuple[str, Callable[[Summary], str]]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _latency_rows(name: str, pick: Callable[[Summary], Stats]) -> list[Row]:
    def cell(stat: str) -> Callable[[Summary], str]:
        return lambda s: _num(getattr(pick(s), stat), 2)

    return [(f"{name} {stat} (ms)", cell(stat)) for stat in ("mean", "p50", "p90", "p99")]


ROWS: list[Row] = [
    ("successful requests", lambda s: f"{s.num_ok}"),
    ("failed requests", lambda s: f"{s.num_errors}"),
    ("duration (s)", lambda s: _num(s.duration_s, 2)),
    ("request throughput (req/s)", lambda s: _num(s.request_throughput, 2)),
    ("output throughput (tok/s)", lambda s: _num(s.output_throughput)),
    ("total token throughput (tok/s)", lambda s: _num(s.total_token_throughput)),
    ("prompt tokens", lambda s: f"{s.prompt_tokens:,}"),
    ("completion tokens", lambda s: f"{s.completion_tokens:,}"),
    ("cached prompt tokens", lambda s: "-" if s.cached_tokens is None else f"{s.cached_tokens:,}"),
    ("prefix hit rate", lambda s: _percent(s.prefix_hit_rate)),
    ("mean hit rate per request", lambda s: _percent(s.mean_request_hit_rate)),
    *_latency_rows("TTFT", lambda s: s.ttft_ms),
    *_latency_rows("ITL", lambda s: s.itl_ms),
    *_latency_rows("E2E", lambda s: s.e2e_ms),
]
GOODPUT_ROWS: list[Row] = [
    ("goodput (req/s)", lambda s: _num(s.goodput, 2)),
    ("requests meeting SLOs", lambda s: _percent(s.good_fraction)),
]


def render_comparison(results: Mapping[str, BenchResult]) -> str:
    """One table: a row per metric, a column per named result."""
    summaries = [r.summary for r in results.values()]
    rows = list(ROWS)
    if any(s.goodput is not None for s in summaries):
        rows += GOODPUT_ROWS
    if any(s.in_flight_cap_hits for s in summaries):
        rows.append(("waits at the in-flight cap", lambda s: f"{s.in_flight_cap_hits}"))
    table = [["", *results]] + [[label, *(cell(s) for s in summaries)] for label, cell in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [_align(line, widths) for line in table]
    if not any(results):  # unnamed columns: no header line
        lines = lines[1:]
    return "\n".join(line.rstrip() for line in lines)


def _align(cells: list[str], widths: list[int]) -> str:
    """The label left-aligned, the numbers right-aligned."""
    values = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join([cells[0].ljust(widths[0]), *values])


def render_summary(result: BenchResult) -> str:
    """The end-of-run report: what was run, the metrics, and the most frequent errors."""
    config = result.config
    workload = config.workload
    shape = ", ".join(f"{f.name}={getattr(workload, f.name)}" for f in dataclasses.fields(workload))
    header = [
        f"target     {result.target}",
        f"model      {result.model}",
        f"workload   {workload.name} ({shape})",
        f"arrivals   {config.arrivals.describe()}, seed {config.seed}",
    ]
    if result.summary.interrupted:
        header.append("           interrupted: the numbers cover the requests that finished")
    if result.speculation is not None:
        header.append(f"drafts     {result.speculation.describe()}")
    out = "\n".join(header) + "\n\n" + render_comparison({"": result})
    errors = list(result.summary.errors.items())[:MAX_ERRORS_SHOWN]
    if errors:
        out += "\n\nerrors:\n" + "\n".join(f"  {n} x {message}" for message, n in errors)
    return out


def write_json(result: BenchResult, path: Path) -> None:
    """Summary, per-request records and the full configuration, in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
