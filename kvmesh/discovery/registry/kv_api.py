"""/v1/kv/:key — GET (one key, ?recurse, ?keys, ?raw; blocking), PUT (?cas, ?flags), DELETE.

Values travel base64-encoded in JSON and as raw bytes in request bodies and `?raw` answers.
A leading "/" in the key is dropped: Consul's HTTP mux redirects "/v1/kv//a" to "/v1/kv/a".
"""

from __future__ import annotations

from aiohttp import web

from kvmesh.discovery.registry import render
from kvmesh.discovery.registry.api import agent_of, block, json_response, not_found
from kvmesh.discovery.registry.errors import UnsupportedError
from kvmesh.discovery.registry.kvstore import validate_key, validate_value
from kvmesh.discovery.registry.params import present, uint


def _key(request: web.Request) -> str:
    return request.match_info["key"].lstrip("/")


async def get(request: web.Request) -> web.StreamResponse:
    dc = agent_of(request).target(request)
    kv, key, query = dc.kv, _key(request), request.query
    listing = present(query, "recurse") or present(query, "keys")
    validate_key(key, allow_empty=listing)
    if present(query, "keys"):
        separator = query.get("separator", "")
        index = await block(request, dc, lambda: kv.prefix_index(key))
        keys = kv.keys(key, separator)
        if not keys and key:
            return not_found(index)
        return json_response(request, keys, index=index)
    if present(query, "recurse"):
        index = await block(request, dc, lambda: kv.prefix_index(key))
        entries = kv.entries(key)
        if not entries:
            return not_found(index)
        return json_response(request, [render.kv_entry(e) for e in entries], index=index)
    index = await block(request, dc, lambda: kv.key_index(key))
    entry = kv.get(key)
    if entry is None:
        return not_found(index)
    if present(query, "raw"):
        return _raw(entry.value or b"", index)
    return json_response(request, [render.kv_entry(entry)], index=index)


async def put(request: web.Request) -> web.Response:
    dc = agent_of(request).target(request)
    key, query = _key(request), request.query
    validate_key(key, allow_empty=False)
    if present(query, "acquire") or present(query, "release"):
        raise UnsupportedError(
            "sessions (?acquire, ?release) are not supported by the embedded registry"
        )
    flags = uint(query, "flags") or 0
    cas = uint(query, "cas")
    validate_value(request.content_length or 0)  # before reading what would be refused
    value = await request.read()
    validate_value(len(value))
    return json_response(request, dc.kv.put(key, value, flags=flags, cas=cas))


async def delete(request: web.Request) -> web.Response:
    dc = agent_of(request).target(request)
    key, query = _key(request), request.query
    cas = uint(query, "cas")
    if cas is not None:  # a CAS delete is of one key, even with ?recurse (as in Consul)
        return json_response(request, dc.kv.delete(key, cas=cas))
    if present(query, "recurse"):
        dc.kv.delete_tree(key)
        return json_response(request, True)
    return json_response(request, dc.kv.delete(key))


def _raw(value: bytes, index: int) -> web.Response:
    try:
        value.decode()
        content_type = "text/plain"
    except UnicodeDecodeError:
        content_type = "application/octet-stream"
    return web.Response(
        body=value,
        content_type=content_type,
        headers={
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Content-Type-Options": "nosniff",
        },
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/kv/{key:.*}", get)
    router.add_put("/v1/kv/{key:.*}", put)
    router.add_delete("/v1/kv/{key:.*}", delete)
