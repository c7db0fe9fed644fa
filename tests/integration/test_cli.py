"""The `kvmesh` command as a newcomer runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

KVMESH = str(Path(sys.executable).with_name("kvmesh"))


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KVMESH, *args], input=stdin, capture_output=True, text=True, timeout=240, check=False
    )


def test_one_shot_chat_streams_an_answer() -> None:
    result = run(
        "chat",
        "-p",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr


def test_interactive_chat_reads_turns_until_end_of_input() -> None:
    result = run(
        "chat",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--device",
        "cpu",
        stdin="Say hello.\n/reset\nName a fruit.\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("tokens/s") == 2
    assert "conversation forgotten" in result.stderr


def test_a_missing_model_is_a_readable_error() -> None:
    result = run("chat", "-p", "hi", "--model", "/no/such/model")
    assert result.returncode == 1
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr
