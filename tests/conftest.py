"""Shared pytest configuration, and the ``load_script`` fixture (a ``scripts/`` file as a module).

``$DAS_GSM8K_PATH`` (the GSM8K train file of the ``gsm8k`` prompt source) defaults here to
``../shared/data/gsm8k/train.jsonl`` beside the repository when that file exists and the variable
is unset; tests that need the file skip when it is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

_SIBLING_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
if not os.environ.get("DAS_GSM8K_PATH") and _SIBLING_GSM8K.is_file():
    os.environ["DAS_GSM8K_PATH"] = str(_SIBLING_GSM8K)

_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """``load_script("bench_soak")``: ``scripts/bench_soak.py`` imported as a module (and
    registered in ``sys.modules``, where its dataclasses look their module up)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, _SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load
