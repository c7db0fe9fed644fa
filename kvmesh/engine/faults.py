"""A test-only fault: a step that holds a planted token raises, as a poison request would.

Off unless the worker's environment sets `KVMESH_TEST_POISON_TOKEN` to a token id: nothing in a
request can turn it on. With it on, a step whose batch computes that token (in a prompt or a
generated sequence) raises `PoisonedStepError` before the executor runs, so the engine's
isolation of the culprit (`EngineCore.step`) can be tested end to end.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog

from kvmesh.engine.scheduler import ScheduledChunk

log = structlog.get_logger(__name__)

POISON_ENV = "KVMESH_TEST_POISON_TOKEN"

StepCheck = Callable[[list[ScheduledChunk]], None]


class PoisonedStepError(RuntimeError):
    """The planted fault."""


def from_environment() -> StepCheck | None:
    value = os.environ.get(POISON_ENV, "")
    if not value:
        return None
    token = int(value)
    log.warning("test fault enabled: a step holding the planted token raises", token_id=token)
    return poison(token)


def poison(token: int) -> StepCheck:
    """A check that raises for a step computing `token`."""

    def check(chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            seq = chunk.seq
            end = seq.num_computed_tokens + chunk.num_tokens
            if token in seq.token_ids[seq.num_computed_tokens : end]:
                raise PoisonedStepError(f"planted fault: token {token} in {seq.request_id!r}")

    return check
