"""`python -m services.edge`: the OpenAI-compatible HTTP/SSE front door to the router."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import structlog

from kvmesh.telemetry import configure_logging
from services.edge.args import parse_args
from services.edge.errors import StartupError
from services.edge.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level, json=config.log_json, service="kvmesh-edge")
    try:
        asyncio.run(serve(config))
    except StartupError as e:
        structlog.get_logger(__name__).error("edge did not start", error=str(e))
        sys.exit(1)


if __name__ == "__main__":
    main()
