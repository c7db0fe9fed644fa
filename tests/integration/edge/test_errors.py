"""Bad input and router failures: the right status, OpenAI's error body, and the edge serves on."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.edge.conftest import MAX_BODY_BYTES
from tests.integration.edge.fake_router import MODEL, FakeRouter

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello"} | fields


def assert_openai_error(
    response: httpx.Response, status: int, *, param: str | None = None, says: str = ""
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]
    return dict(error)


@pytest.fixture
async def still_serving(http: httpx.AsyncClient) -> Any:
    yield
    response = await http.post(CHAT, json=chat())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hello"


INVALID_CHAT = [
    ({"model": MODEL}, "messages", "Missing required parameter: 'messages'"),
    ({"messages": USER}, "model", "Missing required parameter: 'model'"),
    (chat(messages=[]), "messages", "must not be empty"),
    (chat(model=5), "model", "valid string"),
    (chat(messages=[{"content": "hi"}]), "messages[0].role", "Missing"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "string"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "string"),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        "messages[0].content",
        "'image_url'; only 'text' parts",
    ),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content", ""),
    (chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (chat(max_tokens="5"), "max_tokens", "valid integer"),
    (chat(max_tokens=1.5), "max_tokens", "valid integer"),
    (chat(max_tokens=2**32), "max_tokens", "less than or equal"),
    (chat(max_completion_tokens=-1), "max_completion_tokens", "greater than or equal to 1"),
    (chat(temperature="hot"), "temperature", "valid number"),
    (chat(top_p=[1]), "top_p", "valid number"),
    (chat(seed=2**64), "seed", "less than or equal"),
    (chat(seed="1"), "seed", "valid integer"),
    (chat(top_k=True), "top_k", "valid integer"),
    (chat(n=2), "n", "only n=1"),
    (chat(n=0), "n", "only n=1"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (chat(stop=5), "stop", "a string or a list"),
    (chat(stop=[1]), "stop[0]", "valid string"),
    (chat(stream="yes"), "stream", "valid boolean"),
    (chat(stream_options={"include_usage": True}), "stream_options", "only allowed"),
    (chat(logprobs=1), "logprobs", "valid boolean"),
    (chat(top_logprobs=2), "top_logprobs", "needs 'logprobs'"),
    (chat(top_logprobs=-1, logprobs=True), "top_logprobs", "greater than or equal to 0"),
    (chat(stop_token_ids=[-1]), "stop_token_ids[0]", "greater than or equal to 0"),
    (chat(ignore_eos="no"), "ignore_eos", "valid boolean"),
    (chat(min_tokens=5), "min_tokens", "not supported"),
    (chat(presence_penalty=0.5), "presence_penalty", "not supported"),
    (chat(presence_penalty=False), "presence_penalty", "not supported"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    (chat(response_format={"type": "json_object"}), "response_format", "not supported"),
]


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(("body", "param", "says"), INVALID_CHAT)
async def test_invalid_chat_request(
    http: httpx.AsyncClient, fake: FakeRouter, body: dict[str, Any], param: str, says: str
) -> None:
    response = await http.post(CHAT, json=body)
    assert_openai_error(response, 400, param=param, says=says)
    assert fake.requests == []  # nothing reached the router


INVALID_COMPLETIONS = [
    ({"model": MODEL}, "prompt", "Missing required parameter: 'prompt'"),
    (completion(prompt=["a", "b"]), "prompt", "only one prompt per request"),
    (completion(prompt=[[1], [2]]), "prompt", "only one prompt per request"),
    (completion(prompt=[]), "prompt", "must not be empty"),
    (completion(prompt=[1, -1]), "prompt", "token 1 must be an integer"),
    (completion(prompt=[1, 2**32]), "prompt", "token 1 must be an integer"),
    (completion(prompt=[True]), "prompt", "token 0 must be an integer"),
    (completion(prompt=5), "prompt", "a string or a list of token ids"),
    (completion(logprobs=True), "logprobs", "valid integer"),
    (completion(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (completion(echo=True), "echo", "not supported"),
    (completion(best_of=2), "best_of", "not supported"),
]


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(("body", "param", "says"), INVALID_COMPLETIONS)
async def test_invalid_completion_request(
    http: httpx.AsyncClient, fake: FakeRouter, body: dict[str, Any], param: str, says: str
) -> None:
    response = await http.post(COMPLETIONS, json=body)
    assert_openai_error(response, 400, param=param, says=says)
    assert fake.requests == []


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"model": ', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "m", "temperature": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
async def test_malformed_body(http: httpx.AsyncClient, content: bytes, says: str) -> None:
    response = await http.post(CHAT, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, says=says)


@pytest.mark.usefixtures("still_serving")
async def test_body_over_the_limit_is_413(http: httpx.AsyncClient, fake: FakeRouter) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * MAX_BODY_BYTES}])
    error = assert_openai_error(await http.post(CHAT, json=big), 413)
    assert error["code"] == "request_too_large"

    async def chunked() -> Any:  # no content-length: the limit holds while reading
        for _ in range(3):
            yield b" " * (MAX_BODY_BYTES // 2)

    assert_openai_error(await http.post(COMPLETIONS, content=chunked()), 413)
    assert fake.requests == []


@pytest.mark.usefixtures("still_serving")
async def test_router_invalid_argument_passes_through(
    http: httpx.AsyncClient, fake: FakeRouter
) -> None:
    # What OpenAI's API allows, the edge passes on; the router judges the rest, and its words
    # reach the client (top_k is vLLM's, with no OpenAI range).
    response = await http.post(CHAT, json=chat(top_k=-1))
    assert_openai_error(response, 400, says="top_k must be >= 0")
    assert fake.requests[0].sampling.top_k == -1


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"min_p": 0.1}, "min_p", "not supported"),
        ({"guided_json": {"type": "object"}}, "guided_json", "not supported"),
        ({"structured_outputs": {"json": {}}}, "structured_outputs", "not supported"),
        ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs", "not supported"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "not supported"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
        (
            {"messages": [{"role": "user", "content": "x", "colour": "red"}]},
            "messages[0].colour",
            "Unrecognized request argument",
        ),
        ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "Unrecognized"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", ""),
        ({"user": 7}, "user", "valid string"),
    ],
)
async def test_out_of_openais_ranges_or_unimplemented_is_a_400_at_the_edge(
    http: httpx.AsyncClient, fake: FakeRouter, fields: dict[str, object], param: str, says: str
) -> None:
    response = await http.post(CHAT, json=chat(**fields))
    assert_openai_error(response, 400, param=param, says=says)
    assert fake.requests == []  # refused before the router


async def test_no_op_values_of_unsupported_fields_are_accepted(
    http: httpx.AsyncClient, fake: FakeRouter
) -> None:
    """What clients send by default, and assistant messages they echo back, still work."""
    assistant = {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": None}
    body = chat(
        messages=[*USER, assistant, *USER],
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        tools=[],
        response_format={"type": "text"},
        store=False,
        user="end-user-42",
    )
    response = await http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert len(fake.requests) == 1


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404(http: httpx.AsyncClient, stream: bool) -> None:
    response = await http.post(CHAT, json=chat(model="no-such-model", stream=stream))
    error = assert_openai_error(response, 404, param="model", says="'no-such-model' is not served")
    assert error["code"] == "model_not_found"


ROUTER_FAILURES = [
    ("RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded", "scripted failure"),
    ("UNAVAILABLE", 503, "service_unavailable", "temporarily unavailable"),
    ("DEADLINE_EXCEEDED", 504, "timeout", "deadline"),
    ("UNAUTHENTICATED", 401, "unauthenticated", "scripted failure"),
    ("PERMISSION_DENIED", 403, "permission_denied", "scripted failure"),
    ("FAILED_PRECONDITION", 500, "internal_error", "internal error"),
    ("INTERNAL", 500, "internal_error", "internal error"),
]


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(("code", "status", "error_code", "says"), ROUTER_FAILURES)
@pytest.mark.parametrize("stream", [False, True])
async def test_router_failure_before_the_first_token(
    http: httpx.AsyncClient, code: str, status: int, error_code: str, says: str, stream: bool
) -> None:
    request_id = f"fail-{code.lower()}-{stream}"
    response = await http.post(
        COMPLETIONS,
        json=completion(prompt=f"fail:{code}", stream=stream),
        headers={"x-request-id": request_id},
    )
    error = assert_openai_error(response, status, says=says)
    assert error["code"] == error_code
    if "scripted failure" not in says:  # a generic message: it names the request instead
        assert request_id in error["message"] and "scripted" not in error["message"]


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(
    ("prompt", "status", "code"), [("no-finish", 502, "bad_gateway"), ("abort", 503, "aborted")]
)
async def test_router_breaking_the_stream_contract(
    http: httpx.AsyncClient, prompt: str, status: int, code: str
) -> None:
    response = await http.post(COMPLETIONS, json=completion(prompt=prompt))
    assert assert_openai_error(response, status)["code"] == code


@pytest.mark.usefixtures("still_serving")
async def test_bad_request_id_header(http: httpx.AsyncClient, fake: FakeRouter) -> None:
    response = await http.post(CHAT, json=chat(), headers={"x-request-id": "has space"})
    assert_openai_error(response, 400, param="x-request-id")
    assert response.headers["x-request-id"] != "has space"
    assert fake.requests == []


@pytest.mark.usefixtures("still_serving")
async def test_unknown_routes_and_methods(http: httpx.AsyncClient) -> None:
    assert_openai_error(await http.get("/v1/nothing"), 404)
    response = await http.get(CHAT)
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"
    error = assert_openai_error(await http.get("/v1/models/no-such-model"), 404, param="model")
    assert error["code"] == "model_not_found"
