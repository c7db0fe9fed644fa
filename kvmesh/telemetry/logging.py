"""One logging setup per process: structlog, JSON when stderr is not a terminal.

Standard-library loggers (uvicorn, grpc, aiohttp, ...) go through the same processors, so a
service writes one stream: JSON lines in production. Lines written inside a request carry its
request id (bound in structlog's contextvars) and its trace and span ids (`tracing.py`).
"""

from __future__ import annotations

import logging
import sys

import structlog

from kvmesh.telemetry import tracing


def _add_trace_ids(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    for key, value in tracing.current_ids().items():
        event.setdefault(key, value)
    return event


def configure_logging(
    level: str | int = "INFO", *, json: bool | None = None, service: str | None = None
) -> None:
    """Route structlog and stdlib logging to stderr; readable on a terminal, JSON otherwise.

    Context bound with `structlog.contextvars` (a request id, say) appears on every line, and
    so do the current span's trace and span ids. `service`: also set up tracing under this
    name (`tracing.configure`).
    """
    if isinstance(level, str):
        named = logging.getLevelName(level.upper())
        if not isinstance(named, int):
            raise ValueError(f"unknown log level {level!r}")
        level = named
    if service is not None:
        tracing.configure(service)
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
