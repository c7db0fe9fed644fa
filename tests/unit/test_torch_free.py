"""Only the torch engine loads torch: the services, the worker runtime, the engine layer and the
CLI import without it, so a router, an edge or a sim worker runs where torch is not installed.

Each target is imported in a fresh interpreter (this one has torch loaded by other tests). A
service package is walked module by module; on failure the message names the first module
after which torch was loaded and the chain of import statements that pulled it in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PACKAGES = ("services.router", "services.edge", "services.autoscaler", "services.controlplane")
MODULES = (
    "kvmesh.worker.runtime",
    "kvmesh.engine",  # the package itself; only kvmesh.engine.torch_engine loads torch
    "kvmesh.engine.registry",
    "kvmesh.engine.trtllm",  # the adapter; tensorrt_llm (and its torch) load when one is built
    "kvmesh.cli",
    "kvmesh.client",
    "services.prefill.servicer",
    "services.decode.servicer",
)

# argv: the target, then "walk" to import every module of the package too. Prints why and exits
# 1 if torch was loaded. A meta-path finder sees the first `import torch` and records the stack
# of import statements that led to it.
_PROBE = """
import importlib, os, pkgutil, sys, traceback

MACHINERY = (os.path.dirname(importlib.__file__) + os.sep, pkgutil.__file__, "<")

class TorchTrap:
    chain = None

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torch" and cls.chain is None:
            cls.chain = [
                f"{os.path.relpath(frame.filename)}:{frame.lineno}: {frame.line}"
                for frame in traceback.extract_stack()[:-1]
                if not frame.filename.startswith(MACHINERY)
            ]
        return None

sys.meta_path.insert(0, TorchTrap)

def names(target, walk):
    yield target
    package = importlib.import_module(target)
    if walk and hasattr(package, "__path__"):
        for info in pkgutil.walk_packages(package.__path__, target + "."):
            if info.name.rpartition(".")[2] != "__main__":
                yield info.name

for name in names(sys.argv[1], sys.argv[2:] == ["walk"]):
    importlib.import_module(name)
    if "torch" in sys.modules:
        chain = "\\n  ".join(reversed(TorchTrap.chain or ["(not recorded)"]))
        print(f"importing {name} loaded torch, innermost import first:\\n  {chain}")
        sys.exit(1)
"""


@pytest.mark.parametrize(
    ("target", "walk"),
    [pytest.param(p, True, id=p) for p in PACKAGES]
    + [pytest.param(m, False, id=m) for m in MODULES],
)
def test_imports_without_torch(target: str, walk: bool) -> None:
    argv = [sys.executable, "-c", _PROBE, target] + (["walk"] if walk else [])
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(
            f"{target} must import without torch\n{result.stdout}{result.stderr}", pytrace=False
        )
