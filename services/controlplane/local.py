"""`LocalActuator`: a cluster's workers as processes on this machine (the embedded default).

`add` starts `python -m services.<tier> --registry <the cluster's agent> --model <spec> ...` and
returns at once; a background task reads the worker's ready line (`kvmesh/process.py`), after
which the replica has its worker id and address. `remove` stops processes the control plane
has already drained (SIGTERM: the worker's own graceful stop; SIGKILL after the grace period).
A process that exits by itself (a crash, an OOM kill) disappears from `replicas()`, so the
reconciler starts a replacement on its next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from kvmesh.process import Child, ChildStartError, start_child, stop_child, wait_ready
from kvmesh.up import worker_devices
from services.controlplane.actuator import ActuatorError, Replica

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Process:
    model: str
    tier: str
    child: Child
    starting: asyncio.Task[None] | None = None

    def replica(self) -> Replica:
        child = self.child
        ready = child.ready and child.alive
        return Replica(
            worker_id=child.worker_id if ready else "",
            model=self.model,
            tier=self.tier,
            name=child.name,
            address=child.address if ready else "",
            ready=ready,
        )


class LocalActuator:
    def __init__(
        self,
        cluster: str,
        *,
        registry: str,
        models: Mapping[str, str],
        capacity: int,
        log_dir: Path,
        worker_args: Sequence[str] = (),
        device: str = "cpu",
        host: str = "127.0.0.1",
        start_timeout_s: float = 300.0,
        grace_s: float = 10.0,
    ) -> None:
        """`models` maps the model id workers register (`SmolLM2-135M-Instruct`) to the
        `--model` a worker is started with (`smollm2`, a path, `dummy:...`)."""
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, not {capacity}")
        self._cluster = cluster
        self._registry = registry
        self._models = dict(models)
        self._capacity = capacity
        self._log_dir = log_dir
        self._worker_args = list(worker_args)
        self._device = device
        self._host = host
        self._start_timeout_s = start_timeout_s
        self._grace_s = grace_s
        self._processes: dict[str, _Process] = {}
        self._stopping: dict[str, _Process] = {}  # removed, not yet known to have exited
        self._numbers = itertools.count()

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def capacity(self) -> int:
        return self._capacity

    async def replicas(self, model: str, tier: str) -> list[Replica]:
        await self._reap()
        return [p.replica() for p in self._processes.values() if (p.model, p.tier) == (model, tier)]

    async def add(self, model: str, tier: str, count: int) -> list[Replica]:
        spec = self._models.get(model)
        if spec is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ActuatorError(
                f"cluster {self._cluster} cannot start model {model!r}: it knows {known} "
                "(start the control plane with --model for it)"
            )
        await self._reap()
        if len(self._processes) + count > self._capacity:
            raise ActuatorError(
                f"cluster {self._cluster} is full: {len(self._processes)} of "
                f"{self._capacity} replicas used, {count} more asked"
            )
        added = []
        for _ in range(count):
            number = next(self._numbers)
            name = f"{self._cluster}-{tier}-{number}"
            device = worker_devices(self._device, number + 1)[number]
            argv = [
                sys.executable, "-m", f"services.{tier}", "--registry", self._registry,
                "--model", spec, "--host", self._host, "--port", "0", "--metrics-port", "0",
                "--device", device, *self._worker_args,
            ]  # fmt: skip
            try:
                child = await start_child(name, argv, self._log_dir)
            except OSError as e:
                raise ActuatorError(f"cluster {self._cluster}: cannot start {name}: {e}") from e
            process = _Process(model, tier, child)
            process.starting = asyncio.create_task(self._wait_ready(process))
            self._processes[name] = process
            added.append(process.replica())
            log.info("worker started", cluster=self._cluster, name=name, model=model, tier=tier)
        return added

    async def remove(self, model: str, tier: str, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self._processes]
        if unknown:
            raise ActuatorError(f"cluster {self._cluster} has no worker named {', '.join(unknown)}")
        stopping = [self._processes.pop(n) for n in names]
        self._stopping.update((p.child.name, p) for p in stopping)
        try:
            await asyncio.gather(*(self._stop(p) for p in stopping))
        finally:
            for p in stopping:
                if not p.child.alive:
                    self._stopping.pop(p.child.name, None)

    async def close(self) -> None:
        """Stop every process, those a cancelled `remove` left stopping included."""
        processes = [*self._processes.values(), *self._stopping.values()]
        self._processes.clear()
        self._stopping.clear()
        await asyncio.gather(*(self._stop(p) for p in processes))

    async def _wait_ready(self, process: _Process) -> None:
        try:
            await wait_ready(process.child, f"{process.tier} serving", self._start_timeout_s)
        except ChildStartError as e:
            log.warning("worker failed to start", cluster=self._cluster, error=str(e))
            with contextlib.suppress(ProcessLookupError):
                process.child.process.kill()

    async def _reap(self) -> None:
        """Forget processes that exited by themselves."""
        for name, process in list(self._processes.items()):
            if not process.child.alive:
                del self._processes[name]
                code = process.child.process.returncode
                log.warning("worker exited", cluster=self._cluster, name=name, code=code)
                await self._stop(process)

    async def _stop(self, process: _Process) -> None:
        if process.starting is not None:
            process.starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await process.starting
        await stop_child(process.child, self._grace_s)
        log.info("worker stopped", cluster=self._cluster, name=process.child.name)
