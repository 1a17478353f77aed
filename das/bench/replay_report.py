"""Compare drafting methods on a recorded trace under several step cost models.

Methods whose decisions do not depend on the cost model are replayed once and their modelled
time is evaluated under every cost model from the replay's per-iteration shapes
(:class:`~policies.step_shapes.StepShapes`); the cost-model policy is replayed once per cost
model, since its budgets depend on the curve.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from das.drafter import DASDrafter
from das.methods import build_drafter
from policies.profiles import CostModel, describe_cost_model, policy_cost_model
from rollouts.replay import ReplayConfig, StepResult, replay_trace
from rollouts.trace import RolloutRecord, group_by_step

logger = logging.getLogger(__name__)

COST_DEPENDENT_METHODS = frozenset({"das_cost_model"})
# Replay start order, slowest first (CPU seconds per method on a synthetic 168k-token trace,
# benchmarks/results/replay_speed_cpu.json: das_cost_model 13.6 for its two cost models,
# das_length_class 7.1, das_fixed 5.2, suffix_global 3.8, das_prompt_only 3.6, ngram 1.2,
# none 0.2); a method not listed starts first.
_START_ORDER = {
    "das_cost_model": 1,
    "das_length_class": 2,
    "das_fixed": 3,
    "suffix_global": 4,
    "das_prompt_only": 5,
    "ngram": 6,
    "none": 7,
}
_START_METHODS = multiprocessing.get_all_start_methods()


@dataclass
class Comparison:
    """results[cost_name][method] = per-step results; plus what the trace held."""

    results: dict[str, dict[str, list[StepResult]]]
    cost_models: dict[str, CostModel]
    trace_summary: dict[str, Any]
    replay_wall_s: float
    source_wins: dict[str, dict[str, int]] = field(default_factory=dict)
    config: ReplayConfig = field(default_factory=ReplayConfig)

    def reduction(self, cost_name: str, method: str, baseline: str, steps: Sequence[int]) -> float:
        """1 - time(method) / time(baseline), summed over ``steps``."""
        by_method = self.results[cost_name]
        ours = sum(r.modelled_s for r in by_method[method] if r.step in steps)
        base = sum(r.modelled_s for r in by_method[baseline] if r.step in steps)
        return 1.0 - ours / base if base > 0 else 0.0

    def to_json(self, command: str) -> dict[str, Any]:
        cost_models = {}
        for cost_name, by_method in self.results.items():
            cost_models[cost_name] = {
                "params": describe_cost_model(self.cost_models[cost_name]),
                "methods": {
                    method: {"steps": [r.to_dict() for r in steps]}
                    for method, steps in by_method.items()
                },
            }
        return {
            "command": command,
            "trace": self.trace_summary,
            "replay_wall_s": self.replay_wall_s,
            "engine": dataclasses.asdict(self.config),
            "source_wins": self.source_wins,
            "cost_models": cost_models,
        }


def summarize_trace(records: Sequence[RolloutRecord]) -> dict[str, Any]:
    lengths = np.array([r.num_response_tokens for r in records])
    steps = sorted({r.step for r in records})
    return {
        "num_rollouts": len(records),
        "num_prompts": len({r.prompt_key for r in records}),
        "steps": steps,
        "mean_response_tokens": float(lengths.mean()) if lengths.size else 0.0,
        "p90_response_tokens": float(np.percentile(lengths, 90)) if lengths.size else 0.0,
        "max_response_tokens": int(lengths.max(initial=0)),
        "share_truncated": float(np.mean([r.finish_reason == "length" for r in records]))
        if records
        else 0.0,
    }


def _replay_job(
    steps: Mapping[int, Sequence[RolloutRecord]],
    method: str,
    cost: CostModel,
    k: int,
    config: ReplayConfig | None = None,
    das_options: Mapping[str, Any] | None = None,
) -> tuple[list[StepResult], dict[str, int] | None]:
    drafter = build_drafter(method, policy_cost_model(cost), k, **(das_options or {}))
    replayed = replay_trace(steps, drafter, cost, config)
    wins = dict(drafter.stats.tokens_by_source) if isinstance(drafter, DASDrafter) else None
    return replayed, wins


def compare_methods(
    records: Sequence[RolloutRecord],
    methods: Sequence[str],
    cost_models: Mapping[str, CostModel],
    num_speculative_tokens: int = 16,
    progress: bool = True,
    jobs: int | None = None,
    config: ReplayConfig | None = None,
    das_options: Mapping[str, Any] | None = None,
) -> Comparison:
    """Replay every method on ``records`` under every cost model, through the engine model
    ``config`` (default :class:`~rollouts.replay.ReplayConfig`); ``das_options`` override
    :class:`~das.config.DASConfig` keys of the DAS methods' drafters.

    Replays are independent, so they run in ``jobs`` worker processes (default: one per CPU),
    the slowest kinds first so that no worker is left with a long replay at the end.
    """
    if not records:
        raise ValueError("the trace holds no rollouts")
    steps = group_by_step(records)
    first_cost = next(iter(cost_models.values()))
    results: dict[str, dict[str, list[StepResult]]] = {name: {} for name in cost_models}
    source_wins: dict[str, dict[str, int]] = {}
    work = [
        (method, cost_name)
        for method in methods
        for cost_name in (cost_models if method in COST_DEPENDENT_METHODS else [None])
    ]
    # Longest processing time first, so that no worker is left alone with a long replay.
    work.sort(key=lambda job: _START_ORDER.get(job[0], 0))
    started = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    context = multiprocessing.get_context("fork" if "fork" in _START_METHODS else "spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(work)), mp_context=context) as pool:
        futures = {
            pool.submit(
                _replay_job,
                steps,
                method,
                cost_models[cost_name] if cost_name else first_cost,
                num_speculative_tokens,
                config,
                das_options,
            ): (method, cost_name)
            for method, cost_name in work
        }
        done = as_completed(futures)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(futures), desc="replay", unit="method")
        outputs = {futures[future]: future.result() for future in done}
    # Assembled in the order of ``methods``, whatever finished first.
    for method, cost_name in sorted(work, key=lambda job: methods.index(job[0])):
        replayed, wins = outputs[(method, cost_name)]
        if wins is not None:
            source_wins[method if cost_name is None else f"{method}@{cost_name}"] = wins
        targets = [cost_name] if cost_name else list(cost_models)
        for target in targets:
            results[target][method] = [r.modelled_under(cost_models[target]) for r in replayed]
    return Comparison(
        results=results,
        cost_models=dict(cost_models),
        trace_summary=summarize_trace(records),
        replay_wall_s=time.perf_counter() - started,
        source_wins=source_wins,
        config=config or ReplayConfig(),
    )


def format_table(comparison: Comparison, baseline: str = "none") -> str:
    """One block per cost model: per-step modelled time and passes, and the change vs baseline."""
    lines = []
    for cost_name, by_method in comparison.results.items():
        steps = [r.step for r in next(iter(by_method.values()))]
        described = describe_cost_model(comparison.cost_models[cost_name])
        lines.append(f"cost model {cost_name}: {described.get('spec') or described['table']}")
        header = f"{'method':<18}" + "".join(f"{'step ' + str(s):>22}" for s in steps)
        lines.append(header + f"{'total s':>10}{'vs ' + baseline:>10}")
        lines.append(" " * 18 + "".join(f"{'s / passes / acc':>22}" for _ in steps))
        base_total = sum(r.modelled_s for r in by_method.get(baseline, []))
        for method, results in by_method.items():
            cells = "".join(
                f"{r.modelled_s:>9.2f} /{r.forward_passes:>5d} /{r.mean_accepted_len:>4.2f}"
                for r in results
            )
            total = sum(r.modelled_s for r in results)
            change = f"{(total / base_total - 1) * 100:+.1f}%" if base_total else "-"
            lines.append(f"{method:<18}{cells}{total:>10.2f}{change:>10}")
        lines.append("")
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """PNG: per-step modelled time by method (one panel per cost model) and acceptance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost_names = list(comparison.results)
    fig, axes = plt.subplots(1, len(cost_names) + 1, figsize=(6 * (len(cost_names) + 1), 4.5))
    for ax, cost_name in zip(axes, cost_names, strict=False):
        by_method = comparison.results[cost_name]
        methods = list(by_method)
        steps = [r.step for r in by_method[methods[0]]]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            times = [r.modelled_s for r in by_method[method]]
            ax.bar(np.arange(len(steps)) + i * width, times, width, label=method)
        ax.set_xticks(np.arange(len(steps)) + 0.4 - width / 2, [f"step {s}" for s in steps])
        ax.set_ylabel("modelled rollout time (s)")
        ax.set_title(f"cost model: {cost_name}")
    axes[0].legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    by_method = comparison.results[cost_names[0]]
    for method, results in by_method.items():
        ax.plot(
            [r.step for r in results], [r.mean_accepted_len for r in results], "o-", label=method
        )
    ax.set_xlabel("step")
    ax.set_ylabel("tokens per request per forward pass")
    ax.set_title("acceptance by step")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
