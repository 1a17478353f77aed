"""Run a Python snippet against vLLM in a fresh CPU process (for tests whose vLLM kernels must
be registered before the code under test is imported)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys


def run_vllm_cpu_script(script: str) -> list[str]:
    """Run ``script`` with ``VLLM_TARGET_DEVICE=cpu`` and no vLLM plugins; its stdout lines.

    Raises:
        AssertionError: with the end of stderr if the script fails.
    """
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_PLUGINS": "none"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def is_vllm_cpu(version: str) -> bool:
    """Whether the installed vLLM is the ``vllm-cpu`` package at ``version``."""
    try:
        return importlib.metadata.version("vllm-cpu") == version
    except importlib.metadata.PackageNotFoundError:
        return False
