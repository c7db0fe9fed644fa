"""One request's output as the router streams it: tokens in, text deltas and usage out.

Tokens arrive from the prefill worker (the first) and from one or more decode workers (the rest,
across migrations); the router keeps everything generated so far (a migrated request continues
from it), detokenizes incrementally, and cuts the text at a stop string the same way the engine
does. Without a tokenizer (a model served as token ids only) the text stays empty.

A request resumed from another router (`resume`) starts with the tokens that router streamed:
they count as generated, and the detokenizer reads them without streaming their text again, so
the text continues exactly where the other router's left off and a stop string can span both.

Latency is recorded as tokens arrive: TTFT (labelled with the tier that computed the prompt,
`first_tier`), the gap between tokens (a message of n tokens counts n gaps of a nth of its
wait), and E2E once it finishes. A resumed request records no TTFT or E2E: they began on the
router that died.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvmesh.api.v1 import common_pb2, generation_pb2
from kvmesh.sampling import SamplingParams
from kvmesh.telemetry import metrics
from kvmesh.text import IncrementalDetokenizer, Tokenizer

PREFILL, DECODE = "prefill", "decode"


class RequestStream:
    def __init__(
        self,
        request_id: str,
        prompt: Sequence[int],
        sampling: SamplingParams,
        tokenizer: Tokenizer | None,
        *,
        return_token_ids: bool,
        cache_salt: str = "",
        model: str = "",
    ) -> None:
        self.request_id = request_id
        self.model = model  # the latency metrics' label
        self.first_tier = DECODE  # set to PREFILL when a prefill worker computed the prompt
        self.cache_salt = cache_salt  # tenant and request salt, as workers hash with it
        self.prompt = list(prompt)
        self.sampling = sampling
        self.generated: list[int] = []
        self.finish_reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self.stop_reason = ""
        self.cached_prompt_tokens = 0
        self.migrations = 0
        self.engine_failures = 0  # workers whose engine failed it (INTERNAL)
        # Worker calls in flight, cancelled when the client's RPC ends (see `cancel_calls`).
        self.calls: set[Any] = set()
        self._tokenizer = tokenizer
        self._detokenizer = (
            IncrementalDetokenizer(tokenizer, stop=sampling.stop) if tokenizer else None
        )
        self._return_token_ids = return_token_ids
        self._started = time.perf_counter()
        self._first_token_s: float | None = None
        self._last_token_at: float | None = None
        self._resumed = False
        self.prefill_s = 0.0

    def cancel_calls(self) -> None:
        """The client's RPC ended (cancelled, or its deadline passed): cancel the worker calls
        still open. A handler suspended at a `yield` never sees the cancellation itself, and
        its generators close only when collected; this does not wait for that."""
        for call in list(self.calls):
            call.cancel()

    def resume(self, token_ids: Sequence[int]) -> generation_pb2.GenerateResponse | None:
        """Start after tokens another router already streamed to the client.

        Their text reached the client already (the same tokens give the same text), so it is
        read, not returned. The last response, if those tokens already end on a stop string.
        """
        self.generated += token_ids
        self._resumed = True
        if self._detokenizer is None:
            return None
        self._detokenizer.add(token_ids)
        stopped_on = self._detokenizer.stopped_on
        if stopped_on is None:
            return None
        return self.add([], [], common_pb2.FINISH_REASON_STOP, stopped_on)

    @property
    def finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    def add(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[common_pb2.TokenLogprob],
        finish_reason: common_pb2.FinishReason.ValueType,
        stop_reason: str,
    ) -> generation_pb2.GenerateResponse | None:
        """Take a worker's message; the response to stream, or None when there is nothing new."""
        if self.finished:
            return None
        now = time.perf_counter()
        if token_ids:
            self._record_tokens(now, len(token_ids))
        self.generated += token_ids
        text, stopped_on = "", None
        if self._detokenizer is not None:
            text, stopped_on = self._detokenizer.add(token_ids), self._detokenizer.stopped_on
        if stopped_on is not None:  # the router saw the stop string
            finish_reason, stop_reason = common_pb2.FINISH_REASON_STOP, stopped_on
        if finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            if self._detokenizer is not None and stopped_on is None:
                text += self._detokenizer.flush()
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
            if not self._resumed:
                metrics.E2E_SECONDS.labels(self.model).observe(now - self._started)
        if not (text or token_ids or self.finished):
            return None
        response = generation_pb2.GenerateResponse(
            request_id=self.request_id,
            text=text,
            logprobs=[self._with_text(lp) for lp in logprobs],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        if self._return_token_ids:
            response.token_ids.extend(token_ids)
        if self.finished:
            response.usage.CopyFrom(self.usage())
            response.timings.CopyFrom(self.timings())
        return response

    def _record_tokens(self, now: float, count: int) -> None:
        if self._first_token_s is None:
            self._first_token_s = now - self._started
            if not self._resumed:
                metrics.TTFT_SECONDS.labels(self.model, self.first_tier).observe(
                    self._first_token_s
                )
        elif self._last_token_at is not None:
            gap = (now - self._last_token_at) / count
            itl = metrics.ITL_SECONDS.labels(self.model)
            for _ in range(count):
                itl.observe(gap)
        self._last_token_at = now

    def _with_text(self, logprob: common_pb2.TokenLogprob) -> common_pb2.TokenLogprob:
        named = common_pb2.TokenLogprob()
        named.CopyFrom(logprob)
        if self._tokenizer is None:
            return named
        named.text = self._tokenizer.decode([logprob.token_id], skip_special_tokens=False)
        for top in named.top:
            top.text = self._tokenizer.decode([top.token_id], skip_special_tokens=False)
        return named

    def usage(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.generated),
            cached_prompt_tokens=self.cached_prompt_tokens,
        )

    def timings(self) -> common_pb2.Timings:
        return common_pb2.Timings(
            prefill_s=self.prefill_s,
            first_token_s=self._first_token_s or 0.0,
            total_s=time.perf_counter() - self._started,
        )
