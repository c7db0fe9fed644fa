"""The sim engine's executor: takes a step's modeled time, produces token ids, moves no tensors.

Token ids are pseudo-random in [0, vocab), never one of the model's EOS ids (so a request ends
by max_tokens, a stop token id or a stop string, never by EOS), drawn from xxh3 of:

- greedy (temperature 0): the engine's seed and every token of the context so far, as a model
  would — the same prompt gives the same tokens on any sim engine with the same seed, whether
  prefilled and decoded in one engine or split between a prefill and a decode engine;
- sampling with a seed: the engine's seed, the request's seed and the position;
- sampling without one: the engine's seed, the request id and the position.

Logprobs are fixed, not computed: the chosen token gets log(1/2); with top_logprobs = n the
list is the chosen token, then n-1 other ids with log(1/4), log(1/8), ...

KV moves (TransferMode.ENGINE) carry a small JSON state (`kvmesh-sim/v1`) naming the export;
the importer checks it and sleeps for the blocks' bytes over the link.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import xxhash

from kvmesh.engine.executor import Sampled
from kvmesh.engine.scheduler import ScheduledChunk
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.sim.options import SimOptions
from kvmesh.engine.sim.timing import ChunkWork, StepTimeModel
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams, TokenLogprob
from kvmesh.types import KvExport

STATE_MAGIC = "kvmesh-sim/v1"
CHOSEN_LOGPROB = math.log(0.5)


@dataclass(slots=True)
class SimSampler:
    """Per-request state: a running hash of the context, for greedy requests."""

    context: xxhash.xxh3_64 | None = None  # over the tokens digested so far
    num_digested: int = 0


class SimExecutor:
    def __init__(
        self,
        timing: StepTimeModel,
        options: SimOptions,
        *,
        seed: int,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        model_id: str,
        block_size: int,
        engine_id: str,
    ) -> None:
        if len(eos_token_ids) >= vocab_size:
            raise InvalidRequestError("every token id of the vocabulary is an EOS id")
        self.timing = timing
        self.options = options
        self.seed = seed
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.model_id = model_id
        self.block_size = block_size
        self.engine_id = engine_id
        self.num_steps = 0
        self.modeled_seconds = 0.0  # the GPU's time over all steps (before `speed`)
        self._noise = random.Random(seed)
        sigma2 = math.log1p(options.noise**2)  # lognormal with mean 1 and this relative std
        self._noise_mu, self._noise_sigma = -sigma2 / 2, math.sqrt(sigma2)

    # -- ModelExecutor -------------------------------------------------------------------------

    def make_sampler(self, params: SamplingParams) -> SimSampler:
        return SimSampler()

    def warm_up(self) -> None:
        """Nothing to compile or capture."""

    def execute(self, chunks: list[ScheduledChunk]) -> list[Sampled]:
        started = time.perf_counter()
        work: list[ChunkWork] = []
        sampling: list[Sequence] = []
        for chunk in chunks:
            seq = chunk.seq
            end = seq.num_computed_tokens + chunk.num_tokens
            samples = end == seq.num_tokens
            work.append(ChunkWork(chunk.num_tokens, seq.num_computed_tokens, samples))
            if samples:
                sampling.append(seq)
        sampled = [self._sample(seq) for seq in sampling]
        modeled = self.timing.step_seconds(work) * self.noise_factor()
        self.num_steps += 1
        self.modeled_seconds += modeled
        remaining = started + modeled / self.options.speed - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)  # on the engine thread: the event loop runs on meanwhile
        return sampled

    def export_state(self, export: KvExport) -> bytes:
        state = {
            "magic": STATE_MAGIC,
            "engine_id": self.engine_id,
            "model_id": self.model_id,
            "num_tokens": export.num_tokens,
            "block_size": export.block_size,
            "num_blocks": len(export.block_ids),
            "kv_bytes": len(export.block_ids) * self.block_bytes,
        }
        return json.dumps(state, sort_keys=True).encode()

    async def receive_kv(self, export: KvExport, block_ids: Seq[int]) -> None:
        """Check the state is a sim export this engine can read; take the link's time."""
        self.read_state(export)
        seconds = self.transfer_seconds(len(block_ids))
        if seconds > 0:
            await asyncio.sleep(seconds)

    # -- the sim's own -------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.timing.shape.kv_bytes_per_token

    def transfer_seconds(self, num_blocks: int) -> float:
        """Wall time to move `num_blocks` KV blocks over the link (scaled by `speed`)."""
        link_bytes_per_s = self.options.link_gbps * 1e9
        return num_blocks * self.block_bytes / link_bytes_per_s / self.options.speed

    def read_state(self, export: KvExport) -> dict[str, Any]:
        """The export's sim state; InvalidRequestError if it is not one this engine can read."""
        try:
            state = json.loads(export.opaque.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            state = None
        if not isinstance(state, dict) or state.get("magic") != STATE_MAGIC:
            raise InvalidRequestError(
                f"cannot import KV: the handle's engine state is not a {STATE_MAGIC} export "
                "(the sim engine imports only from sim engines)"
            )
        problems = []
        if state.get("model_id") != self.model_id:
            problems.append(f"model {state.get('model_id')!r} differs from {self.model_id!r}")
        if state.get("block_size") != self.block_size:
            problems.append(f"block size {state.get('block_size')} differs from {self.block_size}")
        if state.get("num_tokens") != export.num_tokens:
            problems.append(
                f"it holds {state.get('num_tokens')} tokens, the handle {export.num_tokens}"
            )
        if problems:
            raise InvalidRequestError("cannot import sim KV: " + "; ".join(problems))
        return state

    def noise_factor(self) -> float:
        """A multiplicative factor with mean 1 and relative std-dev `noise` (1 without noise)."""
        if self._noise_sigma == 0:
            return 1.0
        return math.exp(self._noise.gauss(self._noise_mu, self._noise_sigma))

    def _sample(self, seq: Sequence) -> Sampled:
        params = seq.sampling
        position = seq.num_tokens
        if params.is_greedy:
            key = self._context_digest(seq)
        elif params.seed is not None:
            key = xxhash.xxh3_64_intdigest(f"s:{params.seed}:{position}".encode(), seed=self.seed)
        else:
            key = xxhash.xxh3_64_intdigest(
                f"r:{seq.request_id}:{position}".encode(), seed=self.seed
            )
        token = self._token(key)
        logprob = None
        if params.logprobs or params.top_logprobs:
            logprob = self._logprob(token, params.top_logprobs)
        return Sampled(seq, token, logprob)

    def _context_digest(self, seq: Sequence) -> int:
        sampler: SimSampler = seq.sampler
        if sampler.context is None:
            sampler.context = xxhash.xxh3_64(seed=self.seed)
        new = seq.token_ids[sampler.num_digested :]
        sampler.context.update(array("I", new).tobytes())
        sampler.num_digested = seq.num_tokens
        return int(sampler.context.intdigest())

    def _token(self, key: int) -> int:
        token = key % self.vocab_size
        while token in self.eos_token_ids:
            token = (token + 1) % self.vocab_size
        return token

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        ranked = [(token, CHOSEN_LOGPROB)]
        ranked += [((token + k) % self.vocab_size, (k + 1) * CHOSEN_LOGPROB) for k in range(1, top)]
        return TokenLogprob(token, CHOSEN_LOGPROB, tuple(ranked[:top]))
