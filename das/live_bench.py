"""Live multi-epoch rollouts on vLLM: the same RL steps under each speculation method.

One engine per method, built one after the other with identical settings (model, dtype, seed,
KV cache, synchronous scheduling, batch limits) and differing only in ``speculative_config``.
Each engine runs ``num_steps`` calls of ``llm.generate`` (one RL step each: every prompt times
``num_samples`` requests) and then one greedy *identity probe* (the first prompts, one sample,
temperature 0), whose tokens are compared with the no-speculation engine's.

Per step, from vLLM's own counters (``llm.get_metrics()``): wall time, engine iterations (each
one forward pass; prefill iterations included), output tokens, drafts, draft and accepted tokens.

No module here imports numba: vLLM's spawned engine process re-imports ``__main__`` (see
``tests/test_cli_imports.py``).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from das.record import gsm8k_prompt_token_ids, progress_bar_factory
from das.vllm_api import WORKER_EXTENSION, das_speculative_config
from rollouts.prompts import Prompt

logger = logging.getLogger(__name__)

LIVE_METHODS = ("none", "ngram", "suffix", "das_fixed", "das_policy", "spec_idle")
COMPARED_METHODS = LIVE_METHODS[:5]  # what a benchmark run compares; spec_idle is a diagnostic
LIVE_METHOD_HELP = {
    "none": "no speculation",
    "ngram": "vLLM's ngram (prompt lookup) proposer, vLLM's default lookup sizes",
    "suffix": "vLLM's suffix method (ArcticInference's suffix tree), vLLM's defaults",
    "das_fixed": "DAS, every request drafts up to K tokens",
    "das_policy": "DAS with the cost-model budget policy, fitted online to this engine",
    "spec_idle": "diagnostic: vLLM's speculative mode that almost never drafts (ngram, 64-token "
    "lookup): what speculation costs an engine before any draft",
}
IDLE_LOOKUP_TOKENS = 64  # an n-gram this long almost never repeats within one rollout


@dataclass(frozen=True)
class LiveWorkload:
    """What every method's engine runs; the engine settings shared by all methods."""

    num_prompts: int = 32
    num_samples: int = 8
    num_steps: int = 4
    max_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0
    num_speculative_tokens: int = 16
    dataset: str | None = None
    model: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    kv_cache_gib: float = 6.0
    probe_prompts: int = 8
    probe_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_samples", "num_steps", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("probe_prompts", "probe_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")

    @property
    def num_requests(self) -> int:
        return self.num_prompts * self.num_samples


def engine_kwargs_for(method: str, num_speculative_tokens: int) -> dict[str, Any]:
    """The vLLM engine arguments that select ``method``; everything else is shared."""
    k = num_speculative_tokens
    if method == "none":
        return {}
    if method == "ngram":
        return {"speculative_config": {"method": "ngram", "num_speculative_tokens": k}}
    if method == "spec_idle":
        lookup = {"prompt_lookup_min": IDLE_LOOKUP_TOKENS, "prompt_lookup_max": IDLE_LOOKUP_TOKENS}
        return {"speculative_config": {"method": "ngram", "num_speculative_tokens": k, **lookup}}
    if method == "suffix":
        return {"speculative_config": {"method": "suffix", "num_speculative_tokens": k}}
    if method in ("das_fixed", "das_policy"):
        policy = "fixed" if method == "das_fixed" else "cost_model"
        return {
            **das_speculative_config({"policy": policy}, num_speculative_tokens=k),
            "worker_extension_cls": WORKER_EXTENSION,
        }
    raise ValueError(f"method={method!r} must be one of {LIVE_METHODS}")


@dataclass
class EngineCounters:
    """vLLM's cumulative counters at one moment (``llm.get_metrics()``)."""

    iterations: int = 0
    generation_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def minus(self, before: EngineCounters) -> EngineCounters:
        return EngineCounters(**{k: v - getattr(before, k) for k, v in asdict(self).items()})


_COUNTER_OF_METRIC = {
    "vllm:generation_tokens": "generation_tokens",
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


def read_counters(llm: Any) -> EngineCounters:
    """Sum vLLM's counters over engines; iterations = observations of the per-step histogram."""
    counters = EngineCounters()
    for metric in llm.get_metrics():
        if metric.name == "vllm:iteration_tokens_total":
            counters.iterations += int(metric.count)
        name = _COUNTER_OF_METRIC.get(metric.name)
        if name is not None:
            setattr(counters, name, getattr(counters, name) + int(metric.value))
    return counters


@dataclass
class StepMeasurement:
    """One RL step (one ``generate`` call) of one method."""

    step: int
    wall_s: float
    decode_iterations: int
    output_tokens: int
    num_requests: int
    num_drafts: int
    draft_tokens: int
    accepted_tokens: int
    mean_response_len: float
    share_truncated: float

    @property
    def mean_accepted_len(self) -> float:
        """Tokens per request per drafting iteration, vLLM's definition (1 without drafts)."""
        return 1.0 + self.accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_accepted_len"] = self.mean_accepted_len
        data["output_tokens_per_s"] = self.output_tokens / self.wall_s if self.wall_s else 0.0
        return data


@dataclass
class MethodRun:
    """Everything one method's engine measured."""

    method: str
    engine_kwargs: dict[str, Any]
    startup_s: float = 0.0
    steps: list[StepMeasurement] = field(default_factory=list)
    probe_tokens: list[list[int]] = field(default_factory=list)
    drafter: Any = None  # DAS proposer counters per worker, for the DAS methods
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_kwargs": self.engine_kwargs,
            "startup_s": self.startup_s,
            "steps": [step.to_dict() for step in self.steps],
            "probe_tokens": self.probe_tokens,
            "drafter": self.drafter,
            "error": self.error,
        }


def _sampling_params(
    temperature: float, top_p: float, max_tokens: int, prompt: Prompt, step: int
) -> Any:
    from vllm import SamplingParams

    # The same extra_args go to every method; only DAS reads them (prompt key = dataset index).
    return SamplingParams(
        n=1,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        detokenize=False,
        extra_args={"das_prompt_key": f"prompt:{prompt.index}", "das_step": step},
    )


def _generate_step(
    llm: Any,
    prompt_tokens: Sequence[list[int]],
    prompts: Sequence[Prompt],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    step: int,
    progress: Callable[..., Any] | bool,
) -> tuple[list[Any], float, EngineCounters]:
    from vllm.inputs import TokensPrompt

    inputs, params = [], []
    for position, prompt in enumerate(prompts):
        for _ in range(samples):
            inputs.append(TokensPrompt(prompt_token_ids=prompt_tokens[position]))
            params.append(_sampling_params(temperature, top_p, max_tokens, prompt, step))
    before = read_counters(llm)
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=progress)
    wall_s = time.perf_counter() - started
    if len(outputs) != len(inputs):
        raise RuntimeError(f"step {step}: {len(inputs)} requests but {len(outputs)} outputs")
    return outputs, wall_s, read_counters(llm).minus(before)


def _measure(
    step: int, outputs: Sequence[Any], wall_s: float, delta: EngineCounters
) -> StepMeasurement:
    lengths = [len(output.outputs[0].token_ids) for output in outputs]
    truncated = sum(output.outputs[0].finish_reason == "length" for output in outputs)
    return StepMeasurement(
        step=step,
        wall_s=wall_s,
        decode_iterations=delta.iterations,
        output_tokens=int(sum(lengths)),
        num_requests=len(outputs),
        num_drafts=delta.num_drafts,
        draft_tokens=delta.num_draft_tokens,
        accepted_tokens=delta.num_accepted_tokens,
        mean_response_len=float(np.mean(lengths)) if lengths else 0.0,
        share_truncated=truncated / len(outputs) if outputs else 0.0,
    )


def run_method(
    method: str,
    workload: LiveWorkload,
    prompts: Sequence[Prompt],
    *,
    progress: bool = True,
    on_step: Callable[[MethodRun], None] | None = None,
) -> MethodRun:
    """Start ``method``'s engine, run every step and the identity probe, then shut it down.

    ``on_step`` is called with the run so far after every measured step. An exception after
    the engine started is kept in ``MethodRun.error`` with the steps measured so far; the
    engine is shut down either way.
    """
    from das.vllm_api import das_stats
    from das.vllm_engine import make_llm

    kwargs = engine_kwargs_for(method, workload.num_speculative_tokens)
    run = MethodRun(method=method, engine_kwargs=kwargs)
    started = time.perf_counter()
    llm = make_llm(
        workload.model,
        dtype=workload.dtype,
        max_model_len=workload.max_model_len,
        seed=workload.seed,
        kv_cache_gib=workload.kv_cache_gib,
        async_scheduling=False,  # speculation forces synchronous scheduling; so does the baseline
        **kwargs,
    )
    run.startup_s = time.perf_counter() - started
    try:
        prompt_tokens = gsm8k_prompt_token_ids(
            llm.get_tokenizer(), prompts, workload.max_tokens, workload.max_model_len
        )
        for step in range(workload.num_steps):
            bar = progress_bar_factory(step, workload.num_steps) if progress else False
            outputs, wall_s, delta = _generate_step(
                llm,
                prompt_tokens,
                prompts,
                samples=workload.num_samples,
                temperature=workload.temperature,
                top_p=workload.top_p,
                max_tokens=workload.max_tokens,
                step=step,
                progress=bar,
            )
            measured = _measure(step, outputs, wall_s, delta)
            run.steps.append(measured)
            if on_step is not None:
                on_step(run)
            logger.info(
                "%s step %d/%d: %.1f s, %d iterations, %d tokens (%.0f tok/s), "
                "accepted len %.2f, mean response %.0f tokens, %.0f%% truncated",
                method,
                step + 1,
                workload.num_steps,
                measured.wall_s,
                measured.decode_iterations,
                measured.output_tokens,
                measured.output_tokens / measured.wall_s,
                measured.mean_accepted_len,
                measured.mean_response_len,
                100 * measured.share_truncated,
            )
        if workload.probe_prompts and workload.probe_tokens:
            probe = prompts[: workload.probe_prompts]
            outputs, _, _ = _generate_step(
                llm,
                prompt_tokens[: len(probe)],
                probe,
                samples=1,
                temperature=0.0,
                top_p=1.0,
                max_tokens=workload.probe_tokens,
                step=workload.num_steps,
                progress=False,
            )
            run.probe_tokens = [list(map(int, output.outputs[0].token_ids)) for output in outputs]
        if method.startswith("das"):
            run.drafter = das_stats(llm).get("drafter")
    except Exception as error:  # keep what was measured; the caller records the failure
        logger.exception("%s failed after %d steps", method, len(run.steps))
        run.error = f"{type(error).__name__}: {error}"
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return run


def identity_report(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict:
    """How many probe sequences match the reference token for token, and where others diverge."""
    if not reference or len(reference) != len(candidate):
        return {"identical": None, "num_sequences": len(candidate), "num_identical": 0}
    divergence = []
    for expected, got in zip(reference, candidate, strict=True):
        first = next(
            (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
            None if len(expected) == len(got) else min(len(expected), len(got)),
        )
        divergence.append(first)
    return {
        "identical": all(position is None for position in divergence),
        "num_sequences": len(candidate),
        "num_identical": sum(position is None for position in divergence),
        "first_divergence": divergence,
    }


def summarize(runs: dict[str, MethodRun], compare_steps: Sequence[int]) -> dict[str, Any]:
    """Per method over ``compare_steps``: wall time and iterations, and their ratio to ``none``."""
    summary: dict[str, Any] = {}
    base = runs.get("none")

    def totals(run: MethodRun) -> tuple[float, int, int] | None:
        chosen = [s for s in run.steps if s.step in compare_steps]
        if len(chosen) != len(compare_steps):
            return None
        return (
            sum(s.wall_s for s in chosen),
            sum(s.decode_iterations for s in chosen),
            sum(s.output_tokens for s in chosen),
        )

    base_totals = totals(base) if base is not None else None
    for name, run in runs.items():
        measured = totals(run)
        if measured is None:
            summary[name] = {"complete": False}
            continue
        wall_s, iterations, tokens = measured
        entry: dict[str, Any] = {
            "complete": True,
            "steps": list(compare_steps),
            "wall_s": wall_s,
            "decode_iterations": iterations,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        }
        if base_totals is not None:
            entry["speedup_vs_none"] = base_totals[0] / wall_s if wall_s else None
            entry["iterations_vs_none"] = iterations / base_totals[1] if base_totals[1] else None
            entry["per_step_wall_vs_none"] = [
                s.wall_s / b.wall_s
                for s, b in zip(run.steps, base.steps, strict=False)
                if b.wall_s > 0
            ]
        if run.probe_tokens and base is not None and name != "none":
            entry["identity"] = identity_report(base.probe_tokens, run.probe_tokens)
        summary[name] = entry
    return summary


def run_comparison(
    methods: Sequence[str],
    workload: LiveWorkload,
    prompts: Sequence[Prompt],
    *,
    on_method_done: Callable[[dict[str, MethodRun]], None] | None = None,
    progress: bool = True,
) -> dict[str, MethodRun]:
    """Run each method in turn (``none`` first, then in the order given).

    ``on_method_done`` gets every run so far after each step and after each method.
    """
    unknown = [m for m in methods if m not in LIVE_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {LIVE_METHODS}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    ordered = sorted(dict.fromkeys(methods), key=lambda m: m != "none")
    runs: dict[str, MethodRun] = {}
    for position, method in enumerate(ordered, start=1):
        logger.info(
            "method %d/%d: %s (%s)", position, len(ordered), method, LIVE_METHOD_HELP[method]
        )

        def step_done(run: MethodRun, method: str = method) -> None:
            if on_method_done is not None:
                on_method_done({**runs, method: run})

        runs[method] = run_method(method, workload, prompts, progress=progress, on_step=step_done)
        if on_method_done is not None:
            on_method_done(runs)
    return runs
