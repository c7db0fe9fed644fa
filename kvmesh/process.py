"""Child processes of the mesh: start one, wait for its ready line, stop it gracefully.

Every kvmesh service prints one line when it serves (`<tier> serving ADDRESS worker_id=ID
metrics_port=PORT`, `router serving ADDRESS metrics_port=PORT`, `edge listening on URL`, ...).
`kvmesh up` and the control plane's local actuator both start services this way: stdout is read
for that line (then drained), stderr goes to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)


class ChildStartError(RuntimeError):
    """A child exited or stayed silent before printing its ready line; the message says where
    its log is."""


@dataclass(slots=True)
class Child:
    """One child process and the line it printed when it started serving."""

    name: str
    process: asyncio.subprocess.Process
    log_file: IO[bytes]
    log_path: Path
    ready_line: str = ""  # the first ready line
    ready_lines: list[str] = field(default_factory=list)  # a registry prints one per datacenter
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """The gRPC address of a worker or router (the edge's URL for the edge)."""
        words = self.ready_line.split()
        return words[-1] if self.ready_line.startswith("edge") else words[2]

    @property
    def metrics_port(self) -> int:
        return int(self.field("metrics_port"))

    @property
    def worker_id(self) -> str:
        return self.field("worker_id")

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def ready(self) -> bool:
        return bool(self.ready_line)

    def field(self, key: str) -> str:
        for word in self.ready_line.split():
            if word.startswith(key + "="):
                return word.split("=", 1)[1]
        raise ValueError(f"{self.name} printed no {key}: {self.ready_line!r}")


async def start_child(
    name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None
) -> Child:
    """Start `argv` in its own session (a signal to the parent's group does not reach it);
    `env` is added to this process's environment."""
    log_path, log_file = _open_log(log_dir, name)
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=log_file,
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    return Child(name, process, log_file, log_path)


async def wait_ready(child: Child, ready_prefix: str, timeout_s: float, *, lines: int = 1) -> Child:
    """Read stdout until `lines` ready lines; then keep draining it so the child never blocks."""
    stdout = child.process.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = await asyncio.wait_for(stdout.readline(), max(remaining, 0.01))
        except TimeoutError:
            raise ChildStartError(
                f"{child.name} did not start in time; see {child.log_path}"
            ) from None
        if not line:
            raise ChildStartError(f"{child.name} exited while starting; see {child.log_path}")
        text = line.decode().strip()
        if text.startswith(ready_prefix):
            child.ready_lines.append(text)
            child.ready_line = child.ready_lines[0]
            if len(child.ready_lines) < lines:
                continue
            child._drain = asyncio.create_task(_drain(stdout))
            return child


async def stop_child(child: Child, grace_s: float) -> int:
    """SIGTERM, then SIGKILL after `grace_s` (+5 s for the child's own shutdown); its code."""
    if child.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.process.wait(), grace_s + 5)
    except TimeoutError:
        log.warning("child did not stop in time; killing it", child=child.name)
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()
        await child.process.wait()
    if child._drain is not None:
        child._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await child._drain
    child.log_file.close()
    return child.process.returncode or 0


def _open_log(log_dir: Path, name: str) -> tuple[Path, IO[bytes]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    return log_path, log_path.open("ab")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
