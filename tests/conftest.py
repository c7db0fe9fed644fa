"""Markers by folder: tests/unit -> unit, tests/integration -> integration, and so on."""

from __future__ import annotations

from pathlib import Path

import pytest

_MARKERS = ("unit", "integration", "e2e", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in _MARKERS:
            if marker in parts:
                item.add_marker(marker)
