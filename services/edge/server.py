"""Running the edge: uvicorn serving `create_app`, as the process or inside someone's event loop.

`serve(config)` is the process. It opens a channel to each cluster's router, serves, prints
`edge listening on http://HOST:PORT` once the socket accepts connections (`kvmesh up` and tests
wait for that line), and on SIGTERM / SIGINT stops: the socket closes, in-flight responses get
`shutdown_grace_s` to end, then are cancelled (which cancels their gRPC calls), then the
channels close and the process exits 0.

`serve_in_background(config, channels)` starts the same server in the running event loop and
returns once it listens, for tests (a fake router's channel, or the real router's; a mapping of
cluster name to channel for several clusters):

    async with await serve_in_background(EdgeConfig(port=0), channel) as edge:
        AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="unused")
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from types import TracebackType

import grpc
import structlog
import uvicorn

from services.edge.app import create_app
from services.edge.args import EdgeConfig, router_addresses
from services.edge.clusters import Cluster, ClusterSet
from services.edge.errors import StartupError
from services.edge.protocol import with_header_timeout
from services.edge.routers import RouterSet

log = structlog.get_logger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, plus an event set once it listens, and its own signal handling."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()
        self._handle_signals = handle_signals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """A signal only starts the shutdown.

        uvicorn's own handler raises the signal again once it has shut down, which ends the
        process before the caller's cleanup (closing the channel) runs. A server in the
        background (tests) leaves signals alone.
        """
        if not self._handle_signals:
            yield
            return
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stopping on signal", signal=sig.name)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait for in-flight responses
        self.should_exit = True


@dataclass(slots=True)
class RunningEdge:
    """A started edge: where it listens, and how to stop it."""

    host: str
    port: int
    clusters: ClusterSet
    _server: _Server
    _task: asyncio.Task[None]
    scheme: str = "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def wait(self) -> None:
        """Until the server has stopped (a signal, or `stop`)."""
        await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop as on SIGTERM: in-flight responses get the grace period, then are cancelled."""
        self._server.should_exit = True
        await self.wait()

    async def __aenter__(self) -> RunningEdge:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve_in_background(
    config: EdgeConfig,
    channels: grpc.aio.Channel | Mapping[str, grpc.aio.Channel] | None = None,
    *,
    handle_signals: bool = False,
) -> RunningEdge:
    """Start the edge; return once it listens. Its routers: the config's addresses (the edge
    opens and closes the channels), or `channels` the caller owns and closes after `stop`
    (one channel for a config of one cluster, else cluster name -> channel)."""
    given = _by_cluster(config, channels) if channels is not None else None
    clusters = ClusterSet(
        [_cluster(config, name, addresses, given) for name, addresses in config.clusters],
        home=config.home,
        request_timeout_s=config.request_timeout_s,
        registry=config.registry,
    )
    server = _Server(
        uvicorn.Config(
            create_app(config, clusters),
            host=config.host,
            port=config.port,
            lifespan="off",
            log_config=None,  # configure_logging() owns logging; uvicorn's records go through it
            access_log=False,  # the middleware writes one structured line per request
            timeout_graceful_shutdown=math.ceil(config.shutdown_grace_s),
            server_header=False,
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None,
            limit_concurrency=config.max_connections,  # past it, uvicorn answers 503
            http=with_header_timeout(config.header_timeout_s),
        ),
        handle_signals=handle_signals,
    )
    await clusters.start()
    task = asyncio.create_task(_serve_until_stopped(server, clusters), name="kvmesh-edge")
    listening = asyncio.create_task(server.listening.wait())
    try:
        await asyncio.wait((task, listening), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        server.should_exit = True
        raise
    finally:
        listening.cancel()
    if not server.listening.is_set():
        await task  # raises StartupError
        raise StartupError("the edge's HTTP server stopped before it listened")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    scheme = "https" if config.tls_cert else "http"
    return RunningEdge(str(host), int(port), clusters, server, task, scheme)


def _cluster(
    config: EdgeConfig,
    name: str,
    addresses: str,
    channels: Mapping[str, grpc.aio.Channel] | None,
) -> Cluster:
    if channels is not None:
        routers = RouterSet(
            channels={addresses: channels[name]},
            request_timeout_s=config.request_timeout_s,
            probe_timeout_s=config.probe_timeout_s,
        )
    else:
        routers = RouterSet(
            addresses=router_addresses(addresses),
            registry=config.registry if config.discover_routers else None,
            datacenter=name if len(config.clusters) > 1 else None,  # else the registry's own
            request_timeout_s=config.request_timeout_s,
            probe_timeout_s=config.probe_timeout_s,
        )
    return Cluster(name, routers)


def _by_cluster(
    config: EdgeConfig, channels: grpc.aio.Channel | Mapping[str, grpc.aio.Channel]
) -> dict[str, grpc.aio.Channel]:
    names = [name for name, _ in config.clusters]
    if not isinstance(channels, Mapping):
        if len(names) != 1:
            raise ValueError(f"one channel for {len(names)} clusters: give one per cluster")
        return {names[0]: channels}
    if sorted(channels) != sorted(names):
        raise ValueError(f"channels for {sorted(channels)}, but the clusters are {names}")
    return {name: channels[name] for name in names}


async def _serve_until_stopped(server: _Server, clusters: ClusterSet) -> None:
    try:
        await server.serve()
    except SystemExit as e:  # uvicorn exits the process when it cannot start; raise instead
        raise StartupError(f"the edge's HTTP server did not start (status {e.code})") from e
    finally:
        await clusters.stop()


async def serve(config: EdgeConfig) -> None:
    """The edge process: serve until SIGTERM / SIGINT, then stop cleanly."""
    edge = await serve_in_background(config, handle_signals=True)
    print(f"edge listening on {edge.url}", flush=True)
    log.info(
        "edge serving",
        url=edge.url,
        clusters=dict(config.clusters),
        home=config.home,
        registry=config.registry,
        discover_routers=config.discover_routers,
    )
    await edge.wait()
    log.info("edge stopped")
