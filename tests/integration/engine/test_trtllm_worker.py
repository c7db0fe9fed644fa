"""A worker asked for `--engine trtllm` where tensorrt_llm is not installed exits with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.engine.trtllm.library import MISSING

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_a_worker_without_tensorrt_llm_exits_with_one_clear_line(tier: str) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}  # the fake is not on it
    done = subprocess.run(
        [sys.executable, "-m", f"services.{tier}", "--engine", "trtllm", "--model",
         "dummy:llama-tiny", "--port", "0", "--metrics-port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"python -m services.{tier}: {MISSING}"
