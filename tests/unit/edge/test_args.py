"""Command line and environment -> EdgeConfig."""

from __future__ import annotations

import pytest

from services.edge.args import DEFAULT_ROUTER, EdgeConfig, parse_args


def test_defaults() -> None:
    assert parse_args([], env={}) == EdgeConfig()
    assert EdgeConfig().router == DEFAULT_ROUTER


def test_router_from_the_environment_and_flags_over_it() -> None:
    assert parse_args([], env={"KVMESH_ROUTER": "10.0.0.1:9"}).router == "10.0.0.1:9"
    flagged = parse_args(["--router", "r:1"], env={"KVMESH_ROUTER": "10.0.0.1:9"})
    assert flagged.router == "r:1"


def test_flags() -> None:
    config = parse_args(
        [
            "--host=0.0.0.0",
            "--port=0",
            "--request-timeout=30",
            "--probe-timeout=0.5",
            "--max-body-bytes=1024",
            "--default-max-tokens=64",
            "--shutdown-grace=2",
            "--log-level=DEBUG",
            "--log-json",
        ],
        env={},
    )
    assert config == EdgeConfig(
        host="0.0.0.0",
        port=0,
        request_timeout_s=30.0,
        probe_timeout_s=0.5,
        max_body_bytes=1024,
        default_max_tokens=64,
        shutdown_grace_s=2.0,
        log_level="DEBUG",
        log_json=True,
    )


@pytest.mark.parametrize(
    "argv", [["--port=70000"], ["--request-timeout=0"], ["--default-max-tokens=0"]]
)
def test_bad_values_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv, env={})
    assert raised.value.code == 2
    assert "usage:" in capsys.readouterr().err
