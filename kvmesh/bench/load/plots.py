"""PNG plots of one or several runs: latency CDFs and throughput over time.

matplotlib is imported here only, when plots are asked for; figures are drawn on the Agg
canvas directly (no pyplot), so nothing global changes and no display is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvmesh.bench.load.metrics import BenchResult, RequestRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIN_BINS, MAX_BINS = 10, 60  # about one bin per second of the run, within these


def write_plots(results: Mapping[str, BenchResult], directory: Path) -> list[Path]:
    """`latency_cdf.png` and `throughput.png` in `directory`, a line per named result."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        _latency_cdfs(results, directory / "latency_cdf.png"),
        _throughput(results, directory / "throughput.png"),
    ]


def _figure(ncols: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * ncols, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, ncols, squeeze=False).ravel())


def _latency_cdfs(results: Mapping[str, BenchResult], path: Path) -> Path:
    figure, axes = _figure(3)
    panels: list[tuple[str, Callable[[RequestRecord], list[float]]]] = [
        ("TTFT", lambda r: [] if r.ttft_s is None else [r.ttft_s]),
        ("ITL", lambda r: r.itls_s),
        ("E2E latency", lambda r: [] if r.e2e_s is None else [r.e2e_s]),
    ]
    for ax, (title, values) in zip(axes, panels, strict=True):
        for name, result in results.items():
            ms = np.sort([v * 1000 for r in result.records if r.ok for v in values(r)])
            if ms.size:
                ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", label=name or None)
        _style(ax, title, "ms", "fraction of samples")
    if any(results):
        axes[0].legend()
    figure.savefig(path, dpi=100)
    return path


def _throughput(results: Mapping[str, BenchResult], path: Path) -> Path:
    figure, axes = _figure(2)
    for name, result in results.items():
        times, tokens = _token_times(result.records)
        done = [r.sent_s + r.e2e_s for r in result.records if r.ok and r.e2e_s is not None]
        end = max([*times, *done], default=0.0)
        if end <= 0:
            continue
        edges = np.linspace(0, end, min(MAX_BINS, max(MIN_BINS, int(end))) + 1)
        width = edges[1] - edges[0]
        centers = (edges[:-1] + edges[1:]) / 2
        axes[0].plot(centers, np.histogram(times, edges, weights=tokens)[0] / width, label=name)
        axes[1].plot(centers, np.histogram(done, edges)[0] / width, label=name)
    _style(axes[0], "output tokens per second", "s since start", "tokens/s")
    _style(axes[1], "completed requests per second", "s since start", "requests/s")
    if any(results):
        axes[0].legend()
    figure.savefig(path, dpi=100)
    return path


def _token_times(records: Sequence[RequestRecord]) -> tuple[list[float], list[int]]:
    """When each chunk arrived (seconds since the start) and how many tokens it carried."""
    times: list[float] = []
    tokens: list[int] = []
    for r in records:
        times += [r.sent_s + t for t in r.chunk_offsets_s]
        tokens += r.chunk_tokens
    return times, tokens


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
