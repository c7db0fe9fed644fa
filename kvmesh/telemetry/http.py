"""The Prometheus `/metrics` endpoint every service exposes."""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server


@dataclass(slots=True)
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int = 0, host: str = "127.0.0.1") -> MetricsServer:
    """Serve the process's metrics at http://host:port/metrics (port 0: any free port)."""
    server, thread = start_http_server(port, addr=host)
    return MetricsServer(server, thread)
