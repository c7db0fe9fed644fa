"""`kvmesh bench` on the command line: a run with its files, clear errors, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmesh.cli import bench
from tests.integration.bench.fake_openai import FakeOpenAI, serve_in_thread

KVMESH = str(Path(sys.executable).with_name("kvmesh"))
SMALL = ["--workload", "random", "--input-len", "8", "--output-len", "4"]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def url(fake: FakeOpenAI) -> Iterator[str]:
    with serve_in_thread(fake) as base:
        yield base


def test_a_run_prints_the_summary_and_writes_json_and_plots(url: str, tmp_path: Path) -> None:
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    args = [*SMALL, "--url", url, "--rate", "100", "--num-requests", "4", "--slo-ttft-ms", "5000"]
    result = CliRunner().invoke(bench, [*args, "--out", str(out), "--plot-dir", str(plots)])
    assert result.exit_code == 0, result.output
    assert f"target     {url}" in result.output
    assert "successful requests" in result.output and "goodput (req/s)" in result.output
    assert "bench: 4/4 done, 0 errors" in result.output  # progress lines away from a terminal
    written = json.loads(out.read_text())
    assert written["summary"]["num_ok"] == 4
    assert written["config"]["arrivals"] == {
        "mode": "open", "rate": 100.0, "distribution": "poisson", "burstiness": 1.0
    }  # fmt: skip
    assert sorted(p.name for p in plots.iterdir()) == ["latency_cdf.png", "throughput.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "-2"], "--rate must be positive"),
        (["--rate", "1", "--concurrency", "2"], "exactly one of --rate R"),
        (["--rate", "1", "--workload", "nope"], "Invalid value for '--workload'"),
        (["--rate", "1", "--groups", "2"], "not options of the random workload: --groups"),
    ],
)
def test_bad_options_are_usage_errors(url: str, args: list[str], message: str) -> None:
    result = CliRunner().invoke(bench, [*SMALL, "--url", url, *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_an_unreachable_url_is_a_clear_error() -> None:
    with serve_in_thread(FakeOpenAI()) as gone:
        pass
    result = CliRunner().invoke(bench, ["--url", gone, "--rate", "1"])
    assert result.exit_code == 1
    assert f"Error: cannot reach {gone}" in result.output and "Traceback" not in result.output


def test_ctrl_c_stops_the_run_and_reports_what_finished(fake: FakeOpenAI, url: str) -> None:
    fake.hang = True
    process = subprocess.Popen(
        [KVMESH, "bench", "--url", url, "--rate", "inf", "--num-requests", "3", *SMALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.requested.wait(timeout=60), "no request arrived"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
