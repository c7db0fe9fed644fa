"""`python -m services.edge` as a process: the readiness line, and a clean stop on a signal."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import httpx

READY = re.compile(r"edge listening on (http://127\.0\.0\.1:\d+)")
REPO = Path(__file__).resolve().parents[3]
BOUND_S = 30.0  # the process imports grpc, starlette and kvmesh before it listens


async def run_until_signal(sig: signal.Signals) -> int:
    """Start an edge, wait for its line, check it answers, signal it; its exit status."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.edge",
        "--port=0",
        "--router=127.0.0.1:1",  # no router: the edge serves anyway, /health says so
        "--log-level=WARNING",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), BOUND_S)
        match = READY.fullmatch(line.decode().strip())
        assert match, line
        async with httpx.AsyncClient(base_url=match[1]) as http:
            assert (await http.get("/health")).status_code == 503
        process.send_signal(sig)
        return await asyncio.wait_for(process.wait(), BOUND_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_process_announces_itself_and_stops_on_sigterm_and_sigint() -> None:
    # Both at once: most of the time is the interpreter importing, and that overlaps.
    statuses = await asyncio.gather(
        run_until_signal(signal.SIGTERM), run_until_signal(signal.SIGINT)
    )
    assert statuses == [0, 0]
