"""uvicorn's h11 protocol with a deadline on each request's headers.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) and the size of a request's
headers (`h11_max_incomplete_event_size`), but not how long the headers may take: a client that
sends one byte a second holds a connection, and a slot of `--max-connections`, for as long as
it likes (slowloris). Here the headers of each request must be complete within `timeout_s` of
the connection opening, or of the request's first byte on a kept-alive connection; else the
answer is 408 with OpenAI's error body and the connection closes, as nginx's
`client_header_timeout` and Envoy's `request_headers_timeout` do.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger(__name__)

_BODY = json.dumps(
    {
        "error": {
            "message": "the request's headers did not arrive in time",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class HeaderTimeoutProtocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE  # h11 leaves IDLE once a request's headers end

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers() or self.transport.is_closing():
            return
        log.warning(
            "request headers timed out; connection closed",
            client=self.client,
            timeout_s=self._header_timeout_s,
        )
        self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def with_header_timeout(timeout_s: float) -> Any:
    """The protocol class to give `uvicorn.Config(http=...)`."""
    return functools.partial(HeaderTimeoutProtocol, header_timeout_s=timeout_s)
