"""The edge's OpenAPI 3.1 document, served at `GET /openapi.json`.

Request bodies are the pydantic models the edge validates with (`openai_schema.py`), so the
document and the checks cannot drift apart; responses are OpenAI's shapes as `convert.py`
writes them. Every error, on every route, is OpenAI's error body. schemathesis reads this
document to fuzz the edge (`tests/e2e/test_fuzz_http.py`).
"""

from __future__ import annotations

from typing import Any

from services.edge.openai_schema import ChatCompletionRequest, CompletionRequest

_REF = "#/components/schemas/{model}"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}

_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": _INT,
        "completion_tokens": _INT,
        "total_tokens": _INT,
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": _INT},
            "required": ["cached_tokens"],
        },
    },
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
}
_FINISH = {"enum": ["stop", "length", None]}
_TOKEN: dict[str, Any] = {"token": _STRING, "logprob": _NUMBER, "bytes": {"type": "null"}}
_TOP = {"type": "object", "properties": _TOKEN, "required": ["token", "logprob"]}
_CHAT_LOGPROBS = _nullable(
    {
        "type": "object",
        "properties": {
            "content": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": _TOKEN | {"top_logprobs": {"type": "array", "items": _TOP}},
                    "required": ["token", "logprob", "top_logprobs"],
                },
            }
        },
        "required": ["content"],
    }
)
_COMPLETION_LOGPROBS = _nullable(
    {
        "type": "object",
        "properties": {
            "tokens": {"type": "array", "items": _STRING},
            "token_logprobs": {"type": "array", "items": _NUMBER},
            "top_logprobs": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": _NUMBER},
            },
            "text_offset": {"type": "array", "items": _INT},
        },
        "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    }
)


def _envelope(object_name: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": _STRING,
            "object": {"const": object_name},
            "created": _INT,
            "model": _STRING,
            "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 1},
            "usage": _USAGE,
        },
        "required": ["id", "object", "created", "model", "choices", "usage"],
    }


RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ChatCompletion": _envelope(
        "chat.completion",
        {
            "type": "object",
            "properties": {
                "index": {"const": 0},
                "message": {
                    "type": "object",
                    "properties": {"role": {"const": "assistant"}, "content": _STRING},
                    "required": ["role", "content"],
                },
                "logprobs": _CHAT_LOGPROBS,
                "finish_reason": _FINISH,
            },
            "required": ["index", "message", "finish_reason"],
        },
    ),
    "Completion": _envelope(
        "text_completion",
        {
            "type": "object",
            "properties": {
                "index": {"const": 0},
                "text": _STRING,
                "logprobs": _COMPLETION_LOGPROBS,
                "finish_reason": _FINISH,
            },
            "required": ["index", "text", "finish_reason"],
        },
    ),
    "Model": {
        "type": "object",
        "properties": {
            "id": _STRING,
            "object": {"const": "model"},
            "created": _INT,
            "owned_by": _STRING,
            "max_model_len": _INT,
        },
        "required": ["id", "object", "created", "owned_by"],
    },
    "ModelList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": _REF.format(model="Model")}},
        },
        "required": ["object", "data"],
    },
    "Health": {
        "type": "object",
        "properties": {"status": {"enum": ["ok", "unavailable"]}, "reason": _STRING},
        "required": ["status"],
    },
    "Error": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": _STRING,
                    "type": _STRING,
                    "param": _nullable(_STRING),
                    "code": _nullable(_STRING),
                },
                "required": ["message", "type", "param", "code"],
            }
        },
        "required": ["error"],
    },
}

_SSE_EVENT = {
    "type": "object",
    "description": "one server-sent event: a chunk as JSON, an error as JSON, or [DONE]",
    "properties": {"event": _STRING, "data": _STRING},
    "required": ["data"],
}
_ERROR = {
    "description": "OpenAI's error body; 400 names the field (`param`)",
    "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=schema)}}},
    }


def _generation(summary: str, request: str, response: str, keyed: bool) -> dict[str, Any]:
    answer = _json("the whole answer, or with `stream: true` server-sent events", response)
    answer["content"]["text/event-stream"] = {"schema": _SSE_EVENT}  # OpenAPI 3.1: one event
    operation: dict[str, Any] = {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=request)}}},
        },
        "responses": {"200": answer, "default": _ERROR},
    }
    return operation | _security(keyed)


def _security(keyed: bool) -> dict[str, Any]:
    return {"security": [{"apiKey": []}]} if keyed else {}


def openapi_document(*, keyed: bool) -> dict[str, Any]:
    """The document for an edge that requires API keys on /v1 (`keyed`) or not."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest):
        schema = model.model_json_schema(ref_template=_REF)
        schemas |= schema.pop("$defs", {})
        schemas[model.__name__] = schema
    schemas |= RESPONSE_SCHEMAS
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "kvmesh edge",
            "version": "1",
            "description": "OpenAI-compatible chat and text completions over kvmesh's mesh.",
        },
        "paths": {
            "/v1/chat/completions": {
                "post": _generation(
                    "Chat completion", "ChatCompletionRequest", "ChatCompletion", keyed
                )
            },
            "/v1/completions": {
                "post": _generation("Text completion", "CompletionRequest", "Completion", keyed)
            },
            "/v1/models": {
                "get": {
                    "summary": "The models the mesh serves",
                    "responses": {"200": _json("the models", "ModelList"), "default": _ERROR},
                }
                | _security(keyed)
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model, or 404",
                    "parameters": [
                        {"name": "model", "in": "path", "required": True, "schema": _STRING}
                    ],
                    "responses": {"200": _json("the model", "Model"), "default": _ERROR},
                }
                | _security(keyed)
            },
            "/health": {
                "get": {
                    "summary": "200 when some cluster that takes requests can serve one",
                    "responses": {
                        "200": _json("serving", "Health"),
                        "503": _json("not serving, and why", "Health"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text of the edge's metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus exposition format",
                            "content": {"text/plain": {"schema": _STRING}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
    if keyed:
        document["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"}
        }
    return document
