"""OpenAI requests -> `GenerateRequest`; `GenerateResponse` messages -> OpenAI JSON and SSE.

One renderer per answer: `add(message)` takes each router message in order and returns the SSE
chunks it becomes (OpenAI's exact chunk shapes); after the last one, `response()` is the
non-streaming JSON object and `usage_chunk()` the `stream_options.include_usage` chunk. Both
modes share that one path, so a streamed and a non-streamed answer cannot disagree.

Logprobs: the router sends each token's id, logprob and text (the token decoded on its own);
where the text is missing the token string is vLLM's `return_tokens_as_token_ids` form,
`"token_id:<id>"`. `bytes` is null (OpenAI's documented "no bytes representation"). Completions'
`text_offset` is where the text delta that carried the token starts. Logprobs of -inf become
-9999.0, as in vLLM: JSON has no infinity.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvmesh.api.v1 import common_pb2, generation_pb2
from services.edge import errors
from services.edge.openai_schema import (
    UINT64_MAX,
    ChatCompletionRequest,
    CompletionRequest,
)

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
MIN_LOGPROB = -9999.0
SSE_DONE = b"data: [DONE]\n\n"

_FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


# -- requests ----------------------------------------------------------------------------------


def chat_request(
    request: ChatCompletionRequest, *, request_id: str, default_max_tokens: int | None
) -> generation_pb2.GenerateRequest:
    messages = [
        generation_pb2.ChatMessage(role=ROLE_ALIASES.get(m.role, m.role), content=m.content)
        for m in request.messages
    ]
    return generation_pb2.GenerateRequest(
        request_id=request_id,
        model=request.model,
        chat=generation_pb2.ChatMessages(messages=messages),
        sampling=_sampling(
            request,
            max_tokens=request.max_new_tokens or default_max_tokens,
            logprobs=bool(request.logprobs),
            top_logprobs=request.top_logprobs or 0,
        ),
        cache_salt=request.cache_salt or "",
    )


def completion_request(
    request: CompletionRequest, *, request_id: str, default_max_tokens: int | None
) -> generation_pb2.GenerateRequest:
    sampling = _sampling(
        request,
        max_tokens=request.max_new_tokens or default_max_tokens,
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs or 0,
    )
    out = generation_pb2.GenerateRequest(
        request_id=request_id,
        model=request.model,
        sampling=sampling,
        cache_salt=request.cache_salt or "",
    )
    if isinstance(request.prompt, str):
        out.text = request.prompt
    else:
        out.token_ids.ids.extend(request.prompt)
    return out


FLOAT32_SMALLEST = 1.401298464324817e-45  # the smallest positive 32-bit float


def _sampling(
    request: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        ignore_eos=bool(request.ignore_eos),
        stop=request.stop or (),
        stop_token_ids=request.stop_token_ids or (),
    )
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if request.temperature is not None:
        params.temperature = request.temperature
    if request.top_p is not None:
        # The proto's float is 32-bit: a top_p too small for it would become 0, which is not
        # in (0, 1]; its smallest positive value keeps the meaning (only the top token).
        params.top_p = max(request.top_p, FLOAT32_SMALLEST)
    if request.top_k is not None:
        params.top_k = request.top_k
    if request.seed is not None:
        # OpenAI seeds are int64, the proto's uint64: two's complement keeps them distinct.
        params.seed = request.seed & UINT64_MAX
    return params


# -- responses ---------------------------------------------------------------------------------


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


@dataclass(slots=True)
class _Renderer:
    """What both endpoints track while the router's messages arrive."""

    id_prefix: ClassVar[str]
    request_id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: common_pb2.Usage | None = None

    def _take(self, message: generation_pb2.GenerateResponse) -> str | None:
        """Record `message`; the finish reason it carries, if any."""
        self.text.append(message.text)
        if message.HasField("usage"):
            self.usage = message.usage
        if message.finish_reason == common_pb2.FINISH_REASON_ABORT:
            raise errors.aborted(self.request_id)
        self.finish_reason = _FINISH_REASONS.get(message.finish_reason)
        return self.finish_reason

    @property
    def id(self) -> str:
        return f"{self.id_prefix}-{self.request_id}"

    def check_finished(self) -> None:
        """Call when the router's stream ends: it must have said how it finished."""
        if self.finish_reason is None:
            raise errors.incomplete_stream(self.request_id)

    def usage_body(self) -> dict[str, Any]:
        usage = self.usage or common_pb2.Usage()
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        }

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the usage one
        return body


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def token_string(token_id: int, text: str = "") -> str:
    """The token's text when the router sent it, else vLLM's `token_id:<id>` form."""
    return text or f"token_id:{token_id}"


@dataclass(slots=True)
class ChatRenderer(_Renderer):
    id_prefix: ClassVar[str] = "chatcmpl"
    logprobs: list[dict[str, Any]] | None = None  # None: not requested
    role_sent: bool = field(default=False, init=False)

    def add(self, message: generation_pb2.GenerateResponse) -> list[dict[str, Any]]:
        if self.finish_reason is not None:
            return []  # nothing follows the last message
        chunks: list[dict[str, Any]] = []
        if not self.role_sent:
            self.role_sent = True
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        finish = self._take(message)
        logprobs = None
        if self.logprobs is not None:
            entries = [_chat_logprob(lp) for lp in message.logprobs]
            self.logprobs += entries
            logprobs = {"content": entries} if entries else None
        if message.text or logprobs:
            chunks.append(self._chunk({"content": message.text}, logprobs=logprobs))
        if finish is not None:
            chunks.append(self._chunk({}, finish_reason=finish))
        return chunks

    def _chunk(
        self,
        delta: dict[str, Any],
        *,
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk", []) | {"usage": self.usage_body()}

    def response(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.text)}
        logprobs = {"content": self.logprobs} if self.logprobs is not None else None
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }
        body = self._envelope("chat.completion", [choice])
        return body | {"usage": self.usage_body()}


def _chat_logprob(lp: common_pb2.TokenLogprob) -> dict[str, Any]:
    return {
        "token": token_string(lp.token_id, lp.text),
        "logprob": _logprob(lp.logprob),
        "bytes": None,
        "top_logprobs": [
            {
                "token": token_string(t.token_id, t.text),
                "logprob": _logprob(t.logprob),
                "bytes": None,
            }
            for t in lp.top
        ],
    }


@dataclass(slots=True)
class CompletionRenderer(_Renderer):
    id_prefix: ClassVar[str] = "cmpl"
    want_logprobs: bool = False
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = field(default=0, init=False)  # characters of text before the next message

    def add(self, message: generation_pb2.GenerateResponse) -> list[dict[str, Any]]:
        if self.finish_reason is not None:
            return []  # nothing follows the last message
        chunks: list[dict[str, Any]] = []
        finish = self._take(message)
        logprobs = self._logprobs(message) if self.want_logprobs else None
        self.offset += len(message.text)
        if message.text or (logprobs and message.logprobs):
            chunks.append(self._chunk(message.text, logprobs=logprobs))
        if finish is not None:
            chunks.append(self._chunk("", finish_reason=finish))
        return chunks

    def _logprobs(self, message: generation_pb2.GenerateResponse) -> dict[str, Any]:
        """This message's logprobs in OpenAI's completions shape; also kept for `response`."""
        part: dict[str, Any] = {
            "tokens": [token_string(lp.token_id, lp.text) for lp in message.logprobs],
            "token_logprobs": [_logprob(lp.logprob) for lp in message.logprobs],
            "top_logprobs": [
                {token_string(t.token_id, t.text): _logprob(t.logprob) for t in lp.top}
                for lp in message.logprobs
            ],
            "text_offset": [self.offset] * len(message.logprobs),
        }
        self.tokens += part["tokens"]
        self.token_logprobs += part["token_logprobs"]
        self.top_logprobs += part["top_logprobs"]
        self.text_offset += part["text_offset"]
        return part

    def _chunk(
        self, text: str, *, logprobs: dict[str, Any] | None = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self) -> dict[str, Any]:
        return self._envelope("text_completion", []) | {"usage": self.usage_body()}

    def response(self) -> dict[str, Any]:
        logprobs = None
        if self.want_logprobs:
            logprobs = {
                "tokens": self.tokens,
                "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset,
            }
        choice = {
            "index": 0,
            "text": "".join(self.text),
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }
        return self._envelope("text_completion", [choice]) | {"usage": self.usage_body()}


Renderer = ChatRenderer | CompletionRenderer
