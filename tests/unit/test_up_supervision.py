"""`kvmesh up`'s restart backoff and the port a restarted child takes."""

from __future__ import annotations

from unittest.mock import MagicMock

from kvmesh.process import Child
from kvmesh.up import _port_of, _with_port, restart_delay


def child(ready_line: str) -> Child:
    return Child("x", MagicMock(), MagicMock(), MagicMock(), ready_line=ready_line)


def test_the_backoff_doubles_from_half_a_second_to_thirty() -> None:
    assert [restart_delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_the_port_comes_from_the_ready_line() -> None:
    assert _port_of(child("router serving 127.0.0.1:50051 metrics_port=9")) == 50051
    assert _port_of(child("edge listening on http://127.0.0.1:8000")) == 8000
    assert _port_of(child("kvmesh registry: dc1 https://127.0.0.1:8501")) == 8501
    assert _port_of(child("")) is None  # never started


def test_the_last_port_flag_is_pinned() -> None:
    argv = ["python", "-m", "services.router", "--port", "0", "--host", "h"]
    assert _with_port(argv, 4242) == [
        "python",
        "-m",
        "services.router",
        "--port",
        "4242",
        "--host",
        "h",
    ]
    assert argv[4] == "0"  # a copy
