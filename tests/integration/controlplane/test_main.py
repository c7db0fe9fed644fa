"""`python -m services.controlplane` refuses to start with a clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "CONSUL"))}
    env |= {"HOME": str(home), "KUBECONFIG": str(home / "no-such-kubeconfig")}
    return subprocess.run(
        [sys.executable, "-m", "services.controlplane", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_kubernetes_without_credentials_says_so(tmp_path: Path) -> None:
    done = _run(
        ["--actuator", "kubernetes", "--registry", "127.0.0.1:1", "--cluster", "a=127.0.0.1:1"],
        tmp_path,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("controlplane: cluster 'a': no Kubernetes credentials")
    assert "Traceback" not in done.stderr


def test_an_unreachable_registry_says_so(tmp_path: Path) -> None:
    done = _run(["--registry", "127.0.0.1:1"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("controlplane: registry at 127.0.0.1:1 unreachable")
    assert "Traceback" not in done.stderr


def test_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    done = _run(["--cluster", "no-equals-sign"], tmp_path)
    assert done.returncode == 2
    assert "--cluster takes NAME=VALUE, not 'no-equals-sign'" in done.stderr
