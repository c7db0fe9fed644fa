"""OpenAI request bodies, checked for shape and type only.

Strict: a string is not a number, 1 is not `true`. Values are not judged here (a negative
temperature, an unknown model, a token id outside the vocabulary): the router does that, so gRPC
and HTTP clients meet the same rules and messages. What the edge does reject is what cannot
cross the gRPC boundary at all (an integer that does not fit its proto field, several prompts)
and OpenAI features kvmesh does not have, because ignoring them would answer a different
question than the one asked. Unknown fields are ignored, as OpenAI's servers do.

`parse_body` turns a JSON object into one of the request models, or raises
`InvalidRequestError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from services.edge.errors import InvalidRequestError

UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
MAX_STOP_SEQUENCES = 4

Uint32 = Annotated[int, Field(ge=0, le=UINT32_MAX)]
PositiveUint32 = Annotated[int, Field(ge=1, le=UINT32_MAX)]
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX)]  # OpenAI's int64 or the proto's uint64
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class StreamOptions(_Model):
    include_usage: bool | None = None


class _GenerationRequest(_Model):
    """What chat completions and completions share."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: PositiveUint32 | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0.0, le=2.0)] | None = None  # OpenAI's range
    top_p: Annotated[FiniteFloat, Field(gt=0.0, le=1.0)] | None = None
    seed: Seed | None = None
    stop: list[str] | None = None  # a single string is normalized to a list of one
    n: int | None = None
    # vLLM-style extensions that map onto SamplingParams
    top_k: Int32 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Uint32] | None = None
    # vLLM's: the request hits only prefix-cache blocks of requests with the same salt
    cache_salt: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None or (isinstance(value, list) and len(value) <= MAX_STOP_SEQUENCES):
            return value
        if isinstance(value, str):
            return [value]
        raise ValueError(f"must be a string or a list of at most {MAX_STOP_SEQUENCES} strings")

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]  # tool calls are not supported
    content: str  # a list of text parts is joined into one string

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            if not isinstance(value, str):
                raise ValueError("must be a string or a list of text parts")
            return value
        texts: list[str] = []
        for index, part in enumerate(value):
            if not isinstance(part, Mapping):
                raise ValueError(f"part {index} must be an object")
            if part.get("type") != "text":
                raise ValueError(
                    f"part {index} has type {part.get('type')!r}; only 'text' parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"part {index} must have a string 'text'")
            texts.append(text)
        return "".join(texts)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveUint32 | None = None  # preferred over max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # OpenAI's range

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must not be empty")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]  # text, or token ids (checked by `_one_prompt`)
    # how many top alternatives per token (0: the chosen only); OpenAI's range
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """OpenAI's prompt is a string, token ids, or a batch of either: take a batch of one."""
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise ValueError("only one prompt per request is supported")
            value = value[0]
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of token ids")
        if not value:
            raise ValueError("must not be empty")
        for index, token in enumerate(value):
            if type(token) is not int or not 0 <= token <= UINT32_MAX:  # bool is an int too
                raise ValueError(f"token {index} must be an integer in [0, 2**32)")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


# Known OpenAI / vLLM fields kvmesh cannot honour; each may only hold its no-op value.
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    # vLLM's sampling and structured-output extensions, and other engines' knobs
    "min_p": (None, 0),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "structured_outputs": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "modalities": (None, ["text"]),
    "min_tokens": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
}
_UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "prediction": (None,),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
}

RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


def parse_body(body: Any, model: type[RequestT]) -> RequestT:
    """Validate a decoded JSON body; InvalidRequestError names the first offending field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    unsupported = dict(_UNSUPPORTED_COMMON)
    unsupported |= _UNSUPPORTED_CHAT if model is ChatCompletionRequest else _UNSUPPORTED_COMPLETION
    for name, no_ops in unsupported.items():
        if name in body and not any(_same(body[name], v) for v in no_ops):
            raise InvalidRequestError(f"'{name}' is not supported by kvmesh", param=name)
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise _invalid(e) from e
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs and not request.logprobs:
        raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return request


def _same(value: Any, no_op: Any) -> bool:
    # In Python `False == 0`: without the bool check `"presence_penalty": false` would pass.
    return bool(value == no_op) and isinstance(value, bool) == isinstance(no_op, bool)


def _invalid(error: ValidationError) -> InvalidRequestError:
    first = error.errors(include_url=False)[0]
    param = _dotted(first["loc"])
    if first["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    reason = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    return InvalidRequestError(f"Invalid value for '{param}': {reason}", param=param)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text
