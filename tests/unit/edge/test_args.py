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
            "--header-timeout=3",
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
        header_timeout_s=3.0,
        log_level="DEBUG",
        log_json=True,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--port=70000"],
        ["--request-timeout=0"],
        ["--default-max-tokens=0"],
        ["--header-timeout=0"],
    ],
)
def test_bad_values_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv, env={})
    assert raised.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_router_is_one_cluster_named_default() -> None:
    config = parse_args(["--router", "r:1"], env={})
    assert config.clusters == (("default", "r:1"),)
    assert config.home == "default"
    assert config.registry is None


def test_clusters_home_and_registry() -> None:
    config = parse_args(
        [
            "--cluster=east=10.0.0.1:50051",
            "--cluster",
            "west=[::1]:50052",
            "--home=west",
            "--registry=127.0.0.1:8500",
        ],
        env={},
    )
    assert config.clusters == (("east", "10.0.0.1:50051"), ("west", "[::1]:50052"))
    assert config.home == "west"
    assert config.router == "[::1]:50052"
    assert config.registry == "127.0.0.1:8500"
    assert parse_args(["--cluster=a=h:1", "--cluster=b=h:2"], env={}).home == "a"


def test_registry_from_the_environment() -> None:
    assert parse_args([], env={"CONSUL_HTTP_ADDR": "c:8500"}).registry == "c:8500"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--router=r:1", "--cluster=a=h:1"], "not allowed with argument --router"),
        (["--cluster=a=h:1", "--cluster=a=h:2"], "cluster names must be unique; repeated: a"),
        (["--cluster=a=h:1", "--home=b"], "home cluster 'b' is not one of the clusters (a)"),
        (["--home=b"], "home cluster 'b' is not one of the clusters (default)"),
        (["--cluster=h:1"], "'h:1' is not NAME=HOST:PORT"),
        (["--cluster=a=h"], "cluster 'a': router address 'h' is not HOST:PORT"),
        (["--cluster=a=h:0"], "cluster 'a': router address 'h:0' is not HOST:PORT"),
        (["--cluster=a=h:99999"], "router address 'h:99999' is not HOST:PORT"),
        (["--cluster==h:1"], "cluster name '' must be"),
        (["--cluster=a b=h:1"], "cluster name 'a b' must be"),
    ],
)
def test_bad_clusters_exit_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv, env={})
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err, err


def test_config_checks_clusters() -> None:
    with pytest.raises(ValueError, match="at least one cluster"):
        EdgeConfig(clusters=())
    with pytest.raises(ValueError, match="no router address"):
        EdgeConfig(clusters=(("a", ""),))
