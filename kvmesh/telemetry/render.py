"""Draw kvmesh's dashboards (`dashboards.py`) from a Prometheus with matplotlib: the same
panels and PromQL as the Grafana JSON, one PNG per dashboard, for docs/dashboards/ where
Grafana cannot run.

    python -m kvmesh.telemetry.render --prometheus http://127.0.0.1:9090 --minutes 10 \\
        --out docs/dashboards
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kvmesh.telemetry.dashboards import DASHBOARDS, Panel


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template).strip()


def _series(
    http: httpx.Client, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    response = http.get(
        "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
    )
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def render(prometheus: str, out: Path, *, minutes: float, end: float | None = None) -> list[Path]:
    end = end or time.time()
    start = end - minutes * 60
    step = max(5.0, minutes * 60 / 200)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with httpx.Client(base_url=prometheus, timeout=30) as http:
        for uid, (title, panels) in DASHBOARDS.items():
            rows = (len(panels) + 1) // 2
            figure, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
            for axis, panel in zip(axes.flat, panels, strict=False):
                _draw(axis, panel, http, start, end, step)
            for axis in list(axes.flat)[len(panels) :]:
                axis.axis("off")
            figure.suptitle(f"{title}  ({minutes:g} min, from Prometheus)", fontsize=13)
            figure.tight_layout()
            path = out / f"{uid}.png"
            figure.savefig(path, dpi=80)
            plt.close(figure)
            written.append(path)
    return written


def _draw(
    axis: Any, panel: Panel, http: httpx.Client, start: float, end: float, step: float
) -> None:
    axis.set_title(panel.title, fontsize=10)
    drawn = 0
    for expr, legend in panel.exprs:
        for series in _series(http, expr, start, end, step):
            points = [(float(t) - start, float(v)) for t, v in series["values"]]
            finite = [(t, v) for t, v in points if v == v and abs(v) != float("inf")]
            if not finite:
                continue
            xs, ys = zip(*finite, strict=True)
            axis.plot([x / 60 for x in xs], ys, label=_legend(legend, series["metric"]) or expr)
            drawn += 1
    if drawn:
        axis.legend(fontsize=7, loc="upper left")
    else:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("minutes", fontsize=8)
    axis.set_ylabel(panel.unit, fontsize=8)
    axis.tick_params(labelsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvmesh.telemetry.render")
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboards"))
    args = parser.parse_args()
    for path in render(args.prometheus, args.out, minutes=args.minutes):
        print(path)


if __name__ == "__main__":
    main()
