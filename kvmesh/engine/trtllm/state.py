"""The handle's engine state: a context-only result's `DisaggregatedParams`, as JSON bytes.

The prefill worker puts these bytes in `KvExport.opaque`; the router carries them unchanged in
`KvHandle.engine_state`; the decode worker turns them back into the `DisaggregatedParams` of a
generation-only request. TensorRT-LLM's own `opaque_state` (its cache transceiver's connection
state, binary) travels base64-encoded inside the document:

    {"format": "kvmesh-trtllm/v1", "model": ..., "block_size": 16, "num_tokens": 123,
     "ctx_request_id": 7, "first_gen_tokens": [42], "draft_tokens": null,
     "opaque_state": "<base64>"}
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from kvmesh.kv.errors import LayoutMismatchError, TransferError

STATE_FORMAT = "kvmesh-trtllm/v1"


@dataclass(frozen=True, slots=True)
class ContextState:
    """What a generation-only request needs from its context-only request."""

    ctx_request_id: int
    first_gen_tokens: tuple[int, ...]
    opaque_state: bytes | None
    draft_tokens: tuple[int, ...] | None
    num_tokens: int

    @classmethod
    def of(cls, params: Any, num_tokens: int) -> ContextState:
        """From the library's `DisaggregatedParams` of a context-only result."""
        if params is None or params.ctx_request_id is None or not params.first_gen_tokens:
            raise TransferError(
                "the context-only result carries no DisaggregatedParams (ctx_request_id and "
                "first_gen_tokens): the engine cannot hand its KV over"
            )
        draft = params.draft_tokens
        return cls(
            ctx_request_id=int(params.ctx_request_id),
            first_gen_tokens=tuple(int(t) for t in params.first_gen_tokens),
            opaque_state=bytes(params.opaque_state) if params.opaque_state is not None else None,
            draft_tokens=tuple(int(t) for t in draft) if draft is not None else None,
            num_tokens=num_tokens,
        )

    def encode(self, *, model_id: str, block_size: int) -> bytes:
        opaque = self.opaque_state
        document = {
            "format": STATE_FORMAT,
            "model": model_id,
            "block_size": block_size,
            "num_tokens": self.num_tokens,
            "ctx_request_id": self.ctx_request_id,
            "first_gen_tokens": list(self.first_gen_tokens),
            "draft_tokens": list(self.draft_tokens) if self.draft_tokens is not None else None,
            "opaque_state": base64.b64encode(opaque).decode() if opaque is not None else None,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, *, model_id: str, block_size: int) -> ContextState:
        """The state a trtllm prefill worker of the same model and block size wrote.

        TransferError for bytes that are not such a document (the decode service then computes
        the prompt locally); LayoutMismatchError for another model or block size."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} document")
            if document["model"] != model_id or document["block_size"] != block_size:
                raise LayoutMismatchError(
                    f"KV of model {document['model']!r} with block size "
                    f"{document['block_size']} cannot be imported by model {model_id!r} with "
                    f"block size {block_size}"
                )
            opaque = document["opaque_state"]
            draft = document["draft_tokens"]
            state = cls(
                ctx_request_id=int(document["ctx_request_id"]),
                first_gen_tokens=tuple(int(t) for t in document["first_gen_tokens"]),
                opaque_state=base64.b64decode(opaque, validate=True) if opaque else None,
                draft_tokens=tuple(int(t) for t in draft) if draft is not None else None,
                num_tokens=int(document["num_tokens"]),
            )
        except LayoutMismatchError:
            raise
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise TransferError(f"the handle's trtllm engine state is unreadable: {e}") from e
        if not state.first_gen_tokens:
            raise TransferError("the handle's trtllm engine state has no first_gen_tokens")
        return state
