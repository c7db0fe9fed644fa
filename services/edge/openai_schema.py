"""OpenAI request bodies, checked against OpenAI's documented types, ranges and enums.

Strict: a string is not a number, 1 is not `true`. The edge rejects, naming the field:
- values outside OpenAI's documented ranges and enums (temperature in [0, 2], a message role);
- what cannot cross the gRPC boundary at all (an integer that does not fit its proto field,
  several prompts);
- OpenAI and vLLM features kvmesh does not have (`Unsupported`: they may only hold their no-op
  value), because ignoring them would answer a different question than the one asked;
- field names it does not know, as OpenAI does ("Unrecognized request argument supplied").
What needs the model (an unknown model, a prompt too long, a token id outside the vocabulary) is
the router's to judge, so gRPC and HTTP clients meet the same rules and messages.

These models are also the request schemas of the edge's OpenAPI document (`openapi.py`).
`parse_body` turns a JSON object into one of them, or raises `InvalidRequestError` naming the
field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from services.edge.errors import InvalidRequestError

UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
MAX_STOP_SEQUENCES = 4


def _integral(value: Any) -> Any:
    """JSON has one number type and JSON Schema's `integer` includes 2.0: take it as 2."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integers take 2 and 2.0, not 2.5, "2" or true. (The bounds go before the validator: after
# it, pydantic would still check them but leave them out of the JSON schema.)
_INTEGRAL = BeforeValidator(_integral)
Integer = Annotated[int, _INTEGRAL]
Uint32 = Annotated[int, Field(ge=0, le=UINT32_MAX), _INTEGRAL]
PositiveUint32 = Annotated[int, Field(ge=1, le=UINT32_MAX), _INTEGRAL]
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX), _INTEGRAL]
Seed = Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX), _INTEGRAL]  # int64 or proto's uint64
TopLogprobs = Annotated[int, Field(ge=0, le=20), _INTEGRAL]  # OpenAI's range, chat
CompletionLogprobs = Annotated[int, Field(ge=0, le=5), _INTEGRAL]  # OpenAI's range, completions
StopString = Annotated[str, StringConstraints(min_length=1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(frozen=True, slots=True, eq=False)  # by identity: (None, 0) == (None, False)
class Unsupported:
    """Marks a known OpenAI / vLLM field kvmesh cannot honour: it may only hold one of its
    no-op values (`None`, or what means "off"); anything else is a 400 naming it.

        min_p: Annotated[Any, Unsupported(None, 0)] = None
    """

    no_ops: tuple[Any, ...]

    def __init__(self, *no_ops: Any) -> None:
        object.__setattr__(self, "no_ops", no_ops)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "enum": list(self.no_ops),
            "description": "Not supported by kvmesh: accepted only with a value that turns it off.",
        }

    def _check(self, value: Any) -> Any:
        if not any(_same(value, no_op) for no_op in self.no_ops):
            raise PydanticCustomError("unsupported", "is not supported by kvmesh")
        return None


def _same(value: Any, no_op: Any) -> bool:
    # In Python `False == 0`: without the bool check `"presence_penalty": false` would pass.
    return bool(value == no_op) and isinstance(value, bool) == isinstance(no_op, bool)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
    stop: Annotated[  # a single string is normalized to a list of one
        list[StopString] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "maxItems": MAX_STOP_SEQUENCES,
                    },
                    {"type": "null"},
                ]
            }
        ),
    ] = None
    n: Annotated[Integer | None, WithJsonSchema({"enum": [1, None]})] = None
    # vLLM-style extensions that map onto SamplingParams
    top_k: Int32 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Uint32] | None = None
    # vLLM's: the request hits only prefix-cache blocks of requests with the same salt
    cache_salt: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    # OpenAI's end-user identifier: written in the request's log line
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    # Known OpenAI / vLLM fields kvmesh cannot honour: only their no-op values
    min_p: Annotated[Any, Unsupported(None, 0)] = None
    guided_json: Annotated[Any, Unsupported(None)] = None
    guided_regex: Annotated[Any, Unsupported(None)] = None
    guided_choice: Annotated[Any, Unsupported(None)] = None
    guided_grammar: Annotated[Any, Unsupported(None)] = None
    guided_decoding_backend: Annotated[Any, Unsupported(None)] = None
    structured_outputs: Annotated[Any, Unsupported(None)] = None
    chat_template: Annotated[Any, Unsupported(None)] = None
    chat_template_kwargs: Annotated[Any, Unsupported(None, {})] = None
    add_generation_prompt: Annotated[Any, Unsupported(None, True)] = None
    continue_final_message: Annotated[Any, Unsupported(None, False)] = None
    skip_special_tokens: Annotated[Any, Unsupported(None, True)] = None
    spaces_between_special_tokens: Annotated[Any, Unsupported(None, True)] = None
    truncate_prompt_tokens: Annotated[Any, Unsupported(None)] = None
    prompt_logprobs: Annotated[Any, Unsupported(None)] = None
    reasoning_effort: Annotated[Any, Unsupported(None)] = None
    verbosity: Annotated[Any, Unsupported(None)] = None
    web_search_options: Annotated[Any, Unsupported(None)] = None
    modalities: Annotated[Any, Unsupported(None, ["text"])] = None
    min_tokens: Annotated[Any, Unsupported(None, 0)] = None
    presence_penalty: Annotated[Any, Unsupported(None, 0)] = None
    frequency_penalty: Annotated[Any, Unsupported(None, 0)] = None
    repetition_penalty: Annotated[Any, Unsupported(None, 1)] = None
    logit_bias: Annotated[Any, Unsupported(None, {})] = None
    best_of: Annotated[Any, Unsupported(None, 1)] = None
    use_beam_search: Annotated[Any, Unsupported(None, False)] = None
    store: Annotated[Any, Unsupported(None, False)] = None
    metadata: Annotated[Any, Unsupported(None, {})] = None
    service_tier: Annotated[Any, Unsupported(None, "auto", "default")] = None

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


_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]  # tool calls are not supported
    content: Annotated[  # a list of text parts is joined into one string
        str,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}),
    ]
    # What an assistant message from an earlier answer may carry back, and names
    name: Annotated[Any, Unsupported(None)] = None
    refusal: Annotated[Any, Unsupported(None)] = None
    tool_calls: Annotated[Any, Unsupported(None, [])] = None
    function_call: Annotated[Any, Unsupported(None)] = None
    audio: Annotated[Any, Unsupported(None)] = None
    annotations: Annotated[Any, Unsupported(None, [])] = None

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
            unknown = sorted(set(part) - {"type", "text"})
            if unknown:
                raise ValueError(f"part {index}: unrecognized argument {unknown[0]!r}")
            texts.append(text)
        return "".join(texts)


def _needs(field: str, *, when: dict[str, Any], holds: Any) -> dict[str, Any]:
    """JSON Schema for a rule across two fields: `field` must be `holds` when one is `when`."""
    ((name, schema),) = when.items()
    return {
        "if": {"properties": {name: schema}, "required": [name]},
        "then": {"properties": {field: {"const": holds}}, "required": [field]},
    }


_STREAM_OPTIONS_NEED_STREAM = _needs(
    "stream", when={"stream_options": {"type": "object"}}, holds=True
)


class ChatCompletionRequest(_GenerationRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _STREAM_OPTIONS_NEED_STREAM,
                _needs(
                    "logprobs", when={"top_logprobs": {"type": "integer", "minimum": 1}}, holds=True
                ),
            ]
        }
    )
    messages: Annotated[list[ChatMessage], Field(json_schema_extra={"minItems": 1})]
    max_completion_tokens: PositiveUint32 | None = None  # preferred over max_tokens
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[Any, Unsupported(None, [])] = None
    functions: Annotated[Any, Unsupported(None, [])] = None
    tool_choice: Annotated[Any, Unsupported(None, "none")] = None
    function_call: Annotated[Any, Unsupported(None, "none")] = None
    parallel_tool_calls: Annotated[Any, Unsupported(None)] = None
    response_format: Annotated[Any, Unsupported(None, {"type": "text"})] = None
    audio: Annotated[Any, Unsupported(None)] = None
    prediction: Annotated[Any, Unsupported(None)] = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must not be empty")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


_TOKEN_IDS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": UINT32_MAX},
    "minItems": 1,
}


class CompletionRequest(_GenerationRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})
    prompt: Annotated[  # text, or token ids (checked by `_one_prompt`), or a batch of one
        str | list[int],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    _TOKEN_IDS,
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                    {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
                ]
            }
        ),
    ]
    # how many top alternatives per token (0: the chosen only); OpenAI's range
    logprobs: CompletionLogprobs | None = None
    echo: Annotated[Any, Unsupported(None, False)] = None
    suffix: Annotated[Any, Unsupported(None, "")] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """OpenAI's prompt is a string, token ids, or a batch of either: take a batch of one."""
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise ValueError("only one prompt per request is supported")
            value = value[0]
        if not isinstance(value, str | list):
            raise ValueError("must be a string or a list of token ids")
        if not value:
            raise ValueError("must not be empty")
        if isinstance(value, str):
            return value
        tokens = [_integral(token) for token in value]
        for index, token in enumerate(tokens):
            if type(token) is not int or not 0 <= token <= UINT32_MAX:  # bool is an int too
                raise ValueError(f"token {index} must be an integer in [0, 2**32)")
        return tokens

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


def parse_body(body: Any, model: type[RequestT]) -> RequestT:
    """Validate a decoded JSON body; InvalidRequestError names the first offending field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
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


def _invalid(error: ValidationError) -> InvalidRequestError:
    first = error.errors(include_url=False)[0]
    param = _dotted(first["loc"])
    if first["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if first["type"] == "extra_forbidden":  # OpenAI's words
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "unsupported":
        return InvalidRequestError(f"'{param}' is not supported by kvmesh", param=param)
    reason = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    return InvalidRequestError(f"Invalid value for '{param}': {reason}", param=param)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text
