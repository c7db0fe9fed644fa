"""Progress while a run goes: one updating line on a terminal, a line every few seconds otherwise.

A log file or CI output would fill with carriage-return redraws from tqdm, so away from a
terminal the same counts are printed as plain lines on a timer (a timer, not on completions,
so a stalled server still shows that it is stalled).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class Progress:
    def __init__(self, total: int, *, enabled: bool, stream: TextIO | None = None) -> None:
        self._total = total
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._done = self._errors = self._in_flight = 0
        self._started = time.perf_counter()
        self._bar: tqdm | None = None
        self._ticker: asyncio.Task[None] | None = None
        if not enabled:
            return
        if self._stream.isatty():
            self._bar = tqdm(total=total, unit="req", file=self._stream, dynamic_ncols=True)
        else:
            self._ticker = asyncio.create_task(self._tick(), name="bench-progress")

    def sent(self) -> None:
        self._in_flight += 1
        self._refresh()

    def finished(self, *, ok: bool) -> None:
        self._in_flight -= 1
        self._done += 1
        if not ok:
            self._errors += 1
        if self._bar is not None:
            self._bar.update(1)
        self._refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._ticker is not None:
            self._ticker.cancel()
            self._print_line()

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(errors=self._errors, in_flight=self._in_flight, refresh=False)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(LOG_INTERVAL_S)
            self._print_line()

    def _print_line(self) -> None:
        elapsed = time.perf_counter() - self._started
        print(
            f"bench: {self._done}/{self._total} done, {self._errors} errors, "
            f"{self._in_flight} in flight, {elapsed:.0f} s",
            file=self._stream,
            flush=True,
        )
