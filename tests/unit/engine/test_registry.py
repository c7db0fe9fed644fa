"""Engines by name: the built-ins, and a plug-in found through its entry point."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.engine import EngineConfig, create_engine, engine_names
from kvmesh.engine.registry import ENTRY_POINT_GROUP
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams
from kvmesh.types import GenerateRequest, TransferMode
from tests.unit.engine.plugin_example import CountingEngine

TESTS_ROOT = Path(__file__).resolve().parents[3]


def install_plugin(directory: Path) -> None:
    """What `pip install` of a package declaring the entry point leaves on sys.path."""
    dist = directory / "kvmesh_counting_engine-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmesh-counting-engine\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ncounting = tests.unit.engine.plugin_example:CountingEngine\n"
    )


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[None]:
    install_plugin(tmp_path)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))


def test_builtin_engines_are_listed_first() -> None:
    assert engine_names()[:2] == ["torch", "sim"]


def test_an_unknown_engine_is_refused_naming_the_choices() -> None:
    with pytest.raises(InvalidRequestError, match=r"no engine 'nope'; engines: torch, sim"):
        create_engine(EngineConfig(engine="nope"))


@pytest.mark.usefixtures("plugin")
async def test_a_plugin_is_found_by_its_entry_point_and_serves() -> None:
    assert "counting" in engine_names()
    engine = create_engine(EngineConfig(engine="counting", block_size=4))
    assert isinstance(engine, CountingEngine)
    assert engine.info.transfer_mode is TransferMode.ENGINE and engine.kv_region() is None
    await engine.start()
    try:
        params = SamplingParams(max_tokens=5, temperature=0.0)
        request = GenerateRequest("r1", (7, 8, 9, 10, 11), params)
        tokens = [t async for out in engine.generate(request) for t in out.token_ids]
        assert tokens == [12, 13, 14, 15, 16]
        # The same prompt again hits the real prefix cache of the real core.
        again = GenerateRequest("r2", (7, 8, 9, 10, 11), params)
        outputs = [out async for out in engine.generate(again)]
        assert outputs[-1].num_cached_tokens == 4
        # Export and import through the engine's own transfer (TransferMode.ENGINE).
        prefilled = await engine.prefill(GenerateRequest("r3", (1, 2, 3, 4, 5, 6), params))
        assert prefilled.export is not None and prefilled.export.opaque == b"counting:6"
        assert await engine.is_idle_and_whole() is False  # the export pins its blocks
        await engine.release_export("r3")
        assert await engine.is_idle_and_whole()
    finally:
        await engine.stop()
