"""Triton's CPU interpreter for kvmesh's kernels, for tests on machines without a GPU.

The kernel modules are loaded afresh, under private names, with TRITON_INTERPRET=1 set while
their `@triton.jit` decorators run (the decorator reads it then, not at launch): the result
does not depend on whether something imported `kvmesh.engine.kernels` earlier, and nothing
leaks to other tests (a GPU test in the same session still gets compiled kernels).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction

import kvmesh

_KERNELS_DIR = Path(kvmesh.__file__).parent / "engine" / "kernels"


@dataclass(frozen=True)
class Kernels:
    decode: ModuleType
    prefill: ModuleType
    fused: ModuleType
    rope: ModuleType


def _scalar_index_patch(original: Callable[..., None]) -> Callable[..., None]:
    """triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses
    (triton-lang/triton#9171); every `range` with a runtime bound fails without this."""

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    return patched


def _call_interpreted(self: JITFunction[Any], *args: Any, **kwargs: Any) -> Any:
    """triton's own `@jit` helpers (tl.cdiv, tl.sigmoid, ...) were decorated when triton was
    imported, most likely before TRITON_INTERPRET was set: run them as the interpreter would."""
    return interpreter.InterpretedFunction(self.fn)(*args, **kwargs)


@contextmanager
def interpreted_kernels() -> Iterator[Kernels]:
    """The kernel modules as the interpreter runs them, for the duration of the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setattr(
            interpreter, "_patch_lang_tensor", _scalar_index_patch(interpreter._patch_lang_tensor)
        )
        patch.setattr(JITFunction, "__call__", _call_interpreted)
        modules: dict[str, ModuleType] = {}
        for name in ("decode", "prefill", "fused", "rope"):
            module_name = f"_kvmesh_interpreted_kernels_{name}"
            spec = importlib.util.spec_from_file_location(module_name, _KERNELS_DIR / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            patch.setitem(sys.modules, module_name, module)  # dataclasses look themselves up
            spec.loader.exec_module(module)
            modules[name] = module
        yield Kernels(**modules)
