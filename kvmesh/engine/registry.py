"""Engines by name: the built-ins, and plug-ins from the entry-point group `kvmesh.engines`.

An entry point names a factory, usually the engine class: called with an `EngineConfig`, it
returns an object that implements `kvmesh.engine.protocol.Engine` (not yet started). A plug-in
package declares it in its own pyproject.toml:

    [project.entry-points."kvmesh.engines"]
    myengine = "my_package.engine:MyEngine"

and workers run it with `--engine myengine`. Factories are imported only when asked for, so
naming the torch engine is what loads torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.protocol import Engine
from kvmesh.errors import InvalidRequestError

ENTRY_POINT_GROUP = "kvmesh.engines"

EngineFactory = Callable[[EngineConfig], Engine]

BUILTIN_ENGINES: dict[str, str] = {
    "torch": "kvmesh.engine.torch_engine:TorchEngine",
    "sim": "kvmesh.engine.sim:SimEngine",
    "trtllm": "kvmesh.engine.trtllm:TrtllmEngine",  # needs tensorrt_llm, imported when built
}


def engine_names() -> list[str]:
    """Every engine that can be asked for: built-ins, then installed plug-ins."""
    plugins = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return [*BUILTIN_ENGINES, *(name for name in plugins if name not in BUILTIN_ENGINES)]


def engine_factory(name: str) -> EngineFactory:
    """The factory registered under `name`; InvalidRequestError naming the choices if none."""
    if name in BUILTIN_ENGINES:
        module, _, attribute = BUILTIN_ENGINES[name].partition(":")
        factory: EngineFactory = getattr(importlib.import_module(module), attribute)
        return factory
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded: EngineFactory = ep.load()
            return loaded
    raise InvalidRequestError(f"no engine {name!r}; engines: {', '.join(engine_names())}")


def create_engine(config: EngineConfig) -> Engine:
    """The engine `config.engine` names, built (weights loaded) but not started."""
    config.validate()
    return engine_factory(config.engine)(config)
