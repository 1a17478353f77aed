"""Live multi-epoch rollouts on vLLM: the same RL steps under each speculation method.

One engine per method with identical settings (model, dtype, seed, KV cache, synchronous
scheduling, batch limits), differing only in ``speculative_config``; the engines run one after
the other, or side by side with their steps interleaved (``interleave=True``).
Each engine runs ``num_steps`` calls of ``llm.generate`` (one RL step each: every prompt times
``num_samples`` requests) and then one greedy *identity probe* (the first prompts, one sample,
temperature 0), whose tokens are compared with the no-speculation engine's.

Per step, from each engine's own stats (:class:`EngineCounterLogger`): wall time, engine
iterations (each one forward pass; prefill iterations included), output tokens, drafts, draft
and accepted tokens.

No module here imports numba: vLLM's spawned engine process re-imports ``__main__`` (see
``tests/test_cli_imports.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from das.bench.breakdown import time_breakdown
from das.bench.machine_probe import probe_seconds
from das.config import DASConfig
from das.vllm.api import WORKER_EXTENSION, das_speculative_config
from das.vllm.record import gsm8k_prompt_token_ids, progress_bar_factory
from rollouts.prompts import Prompt

logger = logging.getLogger(__name__)

LIVE_METHODS = ("none", "ngram", "suffix", "das_fixed", "das_policy", "spec_idle", "none_repeat")
COMPARED_METHODS = LIVE_METHODS[:5]  # what a benchmark run compares; the rest are diagnostics
LIVE_METHOD_HELP = {
    "none": "no speculation",
    "ngram": "vLLM's ngram (prompt lookup) proposer, vLLM's default lookup sizes",
    "suffix": "vLLM's suffix method (ArcticInference's suffix tree), vLLM's defaults",
    "das_fixed": "DAS, every request drafts up to K tokens",
    "das_policy": "DAS with the cost-model budget policy, fitted online to this engine",
    "spec_idle": "diagnostic: vLLM's speculative mode that almost never drafts (ngram, 64-token "
    "lookup): what speculation costs an engine before any draft",
    "none_repeat": "diagnostic: a second no-speculation engine; with --interleave, its ratio to "
    "none is the machine's own step-to-step noise (an A/A comparison)",
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
    keyed: bool = False  # position-keyed sampling: every method samples the same rollouts
    # DAS config keys set on the DAS methods' engines (das.config.DASConfig), as (key, value).
    das_options: tuple[tuple[str, Any], ...] = ()

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
        if self.das_options:  # unknown keys or bad values fail here, before any engine starts
            DASConfig.from_dict(dict(self.das_options))

    @property
    def num_requests(self) -> int:
        return self.num_prompts * self.num_samples


def engine_kwargs_for(
    method: str, num_speculative_tokens: int, das_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The vLLM engine arguments that select ``method``; everything else is shared.
    ``das_options`` are DAS config keys for the DAS methods (the method sets ``policy``)."""
    k = num_speculative_tokens
    if method in ("none", "none_repeat"):
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
            **das_speculative_config(
                {**(das_options or {}), "policy": policy}, num_speculative_tokens=k
            ),
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


class EngineCounterLogger:
    """A vLLM stat logger that counts one engine's iterations, tokens and drafts.

    vLLM's Prometheus metrics live in one process-wide registry that each new engine resets,
    so two engines in one process (the interleaved benchmark) cannot be told apart there. This
    logger is attached to one engine's ``logger_manager`` and counts what its Prometheus
    logger would: one iteration per record with iteration stats (the ``iteration_tokens``
    histogram's observations), generation tokens, and the spec-decoding counters.
    """

    def __init__(self) -> None:
        self.counters = EngineCounters()

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        counters = self.counters
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            counters.num_drafts += int(spec.num_drafts)
            counters.num_draft_tokens += int(spec.num_draft_tokens)
            counters.num_accepted_tokens += int(spec.num_accepted_tokens)
        if iteration_stats is not None:
            counters.iterations += 1
            counters.generation_tokens += int(iteration_stats.num_generation_tokens)

    def snapshot(self) -> EngineCounters:
        return EngineCounters(**asdict(self.counters))

    # The rest of vLLM's stat-logger interface: nothing to do.
    def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
        return None

    def log(self) -> None:
        return None

    def log_engine_initialized(self) -> None:
        return None


def attach_counters(llm: Any) -> EngineCounterLogger:
    """Count ``llm``'s iterations from now on (:class:`EngineCounterLogger`).

    Raises:
        RuntimeError: when the engine keeps no stat loggers (``disable_log_stats``).
    """
    manager = getattr(llm.llm_engine, "logger_manager", None)
    if manager is None:
        raise RuntimeError("the engine logs no stats (disable_log_stats): cannot count iterations")
    counter = EngineCounterLogger()
    manager.stat_loggers.append(counter)
    return counter


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
    output_digest: str = ""  # sha256 of every request's output token ids, in request order
    # DAS methods only: seconds inside DAS's propose during the step (drafting, bookkeeping,
    # policy), and the engine's fitted step cost model at the step's end.
    propose_s: float | None = None
    cost_model: dict[str, float] | None = None
    # DAS methods only: engine steps that verified any draft, and the requests of those steps
    # (what vLLM's verify path costs per request), and the step's own observations of the
    # online cost fit (engine steps: tokens, KV tokens read, seconds, draft tokens).
    spec_steps: int | None = None
    spec_step_requests: int | None = None
    cost_observations: dict[str, list[float]] | None = None
    # CPU seconds of the engine's processes (and this one) during the step, and of everything
    # else on the machine (das.bench.engine_cpu): a slow step with less engine CPU than wall x cores
    # was starved, not busier.
    engine_cpu_s: float | None = None
    other_cpu_s: float | None = None
    # Seconds of a fixed piece of work (das.bench.machine_probe) right before and right after the
    # step: how fast the machine was. A shared VM's speed drifts by 2-3x within minutes.
    probe_before_s: float | None = None
    probe_after_s: float | None = None

    @property
    def machine_probe_s(self) -> float | None:
        """Mean of the probes around the step (None if either is missing)."""
        if self.probe_before_s is None or self.probe_after_s is None:
            return None
        return (self.probe_before_s + self.probe_after_s) / 2

    @property
    def mean_accepted_len(self) -> float:
        """Tokens per request per drafting iteration, vLLM's definition (1 without drafts)."""
        return 1.0 + self.accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_accepted_len"] = self.mean_accepted_len
        data["machine_probe_s"] = self.machine_probe_s
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


def rollout_seed(base_seed: int, prompt_index: int, sample: int, step: int) -> int:
    """The seed of one keyed rollout: a function of (run seed, prompt, sample, step) only, so
    every method's engine samples the same rollout with the same noise."""
    mixed = base_seed
    for part in (prompt_index, sample, step):
        mixed = (mixed * 1_000_003 + part + 1) & 0xFFFF_FFFF_FFFF_FFFF
    return mixed & 0x7FFF_FFFF_FFFF_FFFF  # vLLM's seeds are signed 64-bit


def _sampling_params(
    temperature: float,
    top_p: float,
    max_tokens: int,
    prompt: Prompt,
    step: int,
    keyed_seed: int | None = None,
) -> Any:
    from vllm import SamplingParams

    # The same extra_args go to every method; only DAS reads them (prompt key = dataset index).
    extra_args: dict[str, Any] = {"das_prompt_key": f"prompt:{prompt.index}", "das_step": step}
    if keyed_seed is not None:
        from das.vllm.keyed import OPTION

        extra_args[OPTION] = True
    return SamplingParams(
        n=1,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        detokenize=False,
        seed=keyed_seed,
        extra_args=extra_args,
    )


def _generate_step(
    llm: Any,
    counters: EngineCounterLogger,
    prompt_tokens: Sequence[list[int]],
    prompts: Sequence[Prompt],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    step: int,
    progress: Callable[..., Any] | bool,
    keyed_base_seed: int | None = None,
) -> tuple[list[Any], float, EngineCounters]:
    from vllm.inputs import TokensPrompt

    inputs, params = [], []
    for position, prompt in enumerate(prompts):
        for sample in range(samples):
            seed = None
            if keyed_base_seed is not None and temperature > 0:
                seed = rollout_seed(keyed_base_seed, prompt.index, sample, step)
            inputs.append(TokensPrompt(prompt_token_ids=prompt_tokens[position]))
            params.append(_sampling_params(temperature, top_p, max_tokens, prompt, step, seed))
    before = counters.snapshot()
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=progress)
    wall_s = time.perf_counter() - started
    if len(outputs) != len(inputs):
        raise RuntimeError(f"step {step}: {len(inputs)} requests but {len(outputs)} outputs")
    return outputs, wall_s, counters.snapshot().minus(before)


def _measure(
    step: int, outputs: Sequence[Any], wall_s: float, delta: EngineCounters
) -> StepMeasurement:
    lengths = [len(output.outputs[0].token_ids) for output in outputs]
    digest = hashlib.sha256()
    for output in outputs:
        digest.update(np.asarray(output.outputs[0].token_ids, dtype=np.int64).tobytes())
        digest.update(b"|")
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
        output_digest=digest.hexdigest(),
    )


class MethodSession:
    """One method's engine, started once, stepped by the caller, then closed.

    A failure after the engine started is kept in ``run.error`` with the steps measured so
    far; later calls then do nothing, and :meth:`close` still shuts the engine down.
    """

    def __init__(self, method: str, workload: LiveWorkload, prompts: Sequence[Prompt]) -> None:
        from das.bench.engine_cpu import EngineCpuClock, child_pids
        from das.vllm.engine import make_llm

        kwargs = engine_kwargs_for(
            method, workload.num_speculative_tokens, dict(workload.das_options)
        )
        self.workload, self.prompts = workload, prompts
        self.run = MethodRun(method=method, engine_kwargs=kwargs)
        children_before = child_pids()
        started = time.perf_counter()
        self.llm: Any = make_llm(
            workload.model,
            dtype=workload.dtype,
            max_model_len=workload.max_model_len,
            seed=workload.seed,
            kv_cache_gib=workload.kv_cache_gib,
            async_scheduling=False,  # speculation forces synchronous scheduling; so does none
            **kwargs,
        )
        self.run.startup_s = time.perf_counter() - started
        self.cpu_clock = EngineCpuClock.started_since(children_before)
        self.counters = attach_counters(self.llm)
        self.prompt_tokens: list[list[int]] = []
        # DAS's cumulative counters at the last reading (propose_s, num_spec_steps, ...).
        self._das_totals: dict[str, float] = {}
        self._guarded(self._tokenize)

    def _tokenize(self) -> None:
        self.prompt_tokens = gsm8k_prompt_token_ids(
            self.llm.get_tokenizer(),
            self.prompts,
            self.workload.max_tokens,
            self.workload.max_model_len,
        )

    def _guarded(self, action: Callable[[], None]) -> None:
        if self.run.error is not None or self.llm is None:
            return
        try:
            action()
        except Exception as error:  # keep what was measured; the caller records the failure
            logger.exception("%s failed after %d steps", self.run.method, len(self.run.steps))
            self.run.error = f"{type(error).__name__}: {error}"

    def step(self, step: int, progress: bool = True) -> None:
        """Run and measure RL step ``step`` (one ``generate`` call)."""
        self._guarded(lambda: self._step(step, progress))

    def _step(self, step: int, progress: bool) -> None:
        workload = self.workload
        bar = progress_bar_factory(step, workload.num_steps) if progress else False
        probe_before_s = probe_seconds()
        cpu_before = self.cpu_clock.read()
        outputs, wall_s, delta = _generate_step(
            self.llm,
            self.counters,
            self.prompt_tokens,
            self.prompts,
            samples=workload.num_samples,
            temperature=workload.temperature,
            top_p=workload.top_p,
            max_tokens=workload.max_tokens,
            step=step,
            progress=bar,
            keyed_base_seed=workload.seed if workload.keyed else None,
        )
        measured = _measure(step, outputs, wall_s, delta)
        measured.engine_cpu_s, measured.other_cpu_s = cpu_before.until(self.cpu_clock.read())
        measured.probe_before_s, measured.probe_after_s = probe_before_s, probe_seconds()
        if self.run.method.startswith("das"):
            self._add_drafter_readings(measured)
        self.run.steps.append(measured)
        logger.info(
            "%s step %d/%d: %.1f s, %d iterations, %d tokens (%.0f tok/s), "
            "accepted len %.2f, mean response %.0f tokens, %.0f%% truncated; "
            "CPU s: engine %.0f, everything else %.0f",
            self.run.method,
            step + 1,
            workload.num_steps,
            measured.wall_s,
            measured.decode_iterations,
            measured.output_tokens,
            measured.output_tokens / measured.wall_s,
            measured.mean_accepted_len,
            measured.mean_response_len,
            100 * measured.share_truncated,
            measured.engine_cpu_s,
            measured.other_cpu_s,
        )

    def _add_drafter_readings(self, measured: StepMeasurement) -> None:
        from das.vllm.api import das_stats

        workers = [w for w in das_stats(self.llm).get("drafter") or [] if w]
        if not workers:
            logger.warning("%s: no DAS counters after step %d", self.run.method, measured.step)
            return
        delta = {}
        for counter in (
            "propose_s",
            "num_spec_steps",
            "num_spec_step_requests",
            "num_cost_observations",
        ):
            total = sum(w.get(counter) or 0 for w in workers)
            delta[counter] = total - self._das_totals.get(counter, 0)
            self._das_totals[counter] = total
        measured.propose_s = float(delta["propose_s"])
        measured.spec_steps = int(delta["num_spec_steps"])
        measured.spec_step_requests = int(delta["num_spec_step_requests"])
        measured.cost_model = workers[0].get("cost_model")
        measured.cost_observations = step_cost_observations(
            workers[0].get("cost_window"), int(delta["num_cost_observations"])
        )

    def finish(self) -> None:
        """Run the greedy identity probe and read DAS's counters."""
        self._guarded(self._finish)

    def _finish(self) -> None:
        from das.vllm.api import das_stats

        workload = self.workload
        if workload.probe_prompts and workload.probe_tokens:
            probe = self.prompts[: workload.probe_prompts]
            outputs, _, _ = _generate_step(
                self.llm,
                self.counters,
                self.prompt_tokens[: len(probe)],
                probe,
                samples=1,
                temperature=0.0,
                top_p=1.0,
                max_tokens=workload.probe_tokens,
                step=workload.num_steps,
                progress=False,
            )
            self.run.probe_tokens = [
                list(map(int, output.outputs[0].token_ids)) for output in outputs
            ]
        if self.run.method.startswith("das"):
            self.run.drafter = das_stats(self.llm).get("drafter")

    def close(self) -> None:
        """Shut the engine down (idempotent)."""
        if self.llm is not None:
            from das.vllm.engine import shutdown_llm

            shutdown_llm(self.llm)
            self.llm = None


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
    session = MethodSession(method, workload, prompts)
    try:
        for step in range(workload.num_steps):
            session.step(step, progress)
            if session.run.error is not None:
                break
            if on_step is not None:
                on_step(session.run)
        session.finish()
    finally:
        session.close()
    return session.run


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
            entry["per_step_wall_vs_none_at_equal_machine_speed"] = [
                probe_adjusted_ratio(s, b) for s, b in zip(run.steps, base.steps, strict=False)
            ]
            if any(s.cost_model for s in run.steps):
                entry["time_breakdown_vs_none"] = [
                    time_breakdown(s, b).to_dict()
                    for s, b in zip(run.steps, base.steps, strict=False)
                    if s.cost_model
                ]
        if run.probe_tokens and base is not None and name != "none":
            entry["identity"] = identity_report(base.probe_tokens, run.probe_tokens)
        if base is not None and name != "none":
            # Per step: the same rollouts as none's, token for token (expected with --keyed).
            entry["rollouts_identical_to_none"] = [
                bool(s.output_digest) and s.output_digest == b.output_digest
                for s, b in zip(run.steps, base.steps, strict=False)
            ]
        summary[name] = entry
    return summary


def probe_adjusted_ratio(step: StepMeasurement, baseline: StepMeasurement) -> float | None:
    """``step.wall_s / baseline.wall_s`` with each wall time divided by its machine probe: the
    ratio had the machine run both steps at the same speed (None without probes)."""
    probe, base_probe = step.machine_probe_s, baseline.machine_probe_s
    if not probe or not base_probe or baseline.wall_s <= 0:
        return None
    return (step.wall_s / probe) / (baseline.wall_s / base_probe)


def step_cost_observations(
    window: dict[str, list[float]] | None, num_new: int
) -> dict[str, list[float]] | None:
    """The last ``num_new`` observations of a cost-fit window (those of the step just run; fewer
    if the window is shorter than the step)."""
    if not window or num_new <= 0:
        return None
    return {name: list(values[-num_new:]) for name, values in window.items()}


def run_comparison(
    methods: Sequence[str],
    workload: LiveWorkload,
    prompts: Sequence[Prompt],
    *,
    on_method_done: Callable[[dict[str, MethodRun]], None] | None = None,
    progress: bool = True,
    interleave: bool = False,
) -> dict[str, MethodRun]:
    """Run each method (``none`` first, then in the order given).

    By default one method's engine runs all its steps before the next engine starts. With
    ``interleave``, every engine is started first and step ``s`` runs on each engine in turn
    (the order reversed on odd steps) before step ``s + 1``: a machine whose speed drifts over
    minutes then slows both sides of every per-step ratio alike. It holds every engine's KV
    cache at once.

    ``on_method_done`` gets every run so far after each step and after each method.
    """
    unknown = [m for m in methods if m not in LIVE_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {LIVE_METHODS}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    ordered = sorted(dict.fromkeys(methods), key=lambda m: m != "none")
    if interleave:
        return _run_interleaved(ordered, workload, prompts, on_method_done, progress)
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


def _run_interleaved(
    ordered: Sequence[str],
    workload: LiveWorkload,
    prompts: Sequence[Prompt],
    on_update: Callable[[dict[str, MethodRun]], None] | None,
    progress: bool,
) -> dict[str, MethodRun]:
    sessions: dict[str, MethodSession] = {}
    try:
        for method in ordered:
            logger.info("starting %s (%s)", method, LIVE_METHOD_HELP[method])
            sessions[method] = MethodSession(method, workload, prompts)
        runs = {method: session.run for method, session in sessions.items()}
        for step in range(workload.num_steps):
            turn = list(ordered) if step % 2 == 0 else list(reversed(ordered))
            for method in turn:
                sessions[method].step(step, progress)
                if on_update is not None:
                    on_update(runs)
        for session in sessions.values():
            session.finish()
        if on_update is not None:
            on_update(runs)
        return runs
    finally:
        for session in sessions.values():
            session.close()
