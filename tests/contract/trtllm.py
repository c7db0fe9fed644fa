"""Where the fake `tensorrt_llm` lives, and how tests put it on a path (and nothing else does)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FAKE_ROOT = Path(__file__).resolve().parent / "trtllm_fake"


@contextmanager
def fake_tensorrt_llm() -> Iterator[None]:
    """`import tensorrt_llm` finds the fake while this is open (this interpreter only)."""
    sys.path.insert(0, str(FAKE_ROOT))
    try:
        yield
    finally:
        sys.path.remove(str(FAKE_ROOT))
        for name in [m for m in sys.modules if m.split(".")[0] == "tensorrt_llm"]:
            del sys.modules[name]
