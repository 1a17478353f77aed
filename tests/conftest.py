"""Shared pytest configuration.

``$DAS_GSM8K_PATH`` (the GSM8K train file of the ``gsm8k`` prompt source) defaults here to
``../shared/data/gsm8k/train.jsonl`` beside the repository when that file exists and the variable
is unset; tests that need the file skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

_SIBLING_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
if not os.environ.get("DAS_GSM8K_PATH") and _SIBLING_GSM8K.is_file():
    os.environ["DAS_GSM8K_PATH"] = str(_SIBLING_GSM8K)
