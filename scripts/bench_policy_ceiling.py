"""How far a length-aware budget policy could cut a step's decode iterations: a replay ceiling.

An RL step lasts as many iterations as its slowest request takes, so the one way a budget
policy cuts iterations without paying for drafts everywhere is to spend them on the request
that will finish last. This benchmark replays one recorded trace (``das-rollout record``) with
the same drafter under five budget policies, in one run, under one step cost model:

* ``none``: no speculation (the baseline of every ratio);
* ``das_fixed``: every request drafts up to K (the most a policy can draft);
* ``das_policy``: DAS's cost-model policy (expected tokens per second of each step);
* ``makespan_predicted``: :func:`policies.budget.makespan_budgets` with the remaining lengths
  a live engine can predict (prompt history and age, :func:`predicted_remaining_tokens`);
* ``makespan_oracle``: the same objective given each request's true remaining length, which
  only a replay knows: the ceiling of any length predictor.

It prints, per method, the iterations and modelled time of steps 2.. against ``none`` and
writes them to JSON. Iterations are exact under the replay's acceptance model (a draft token
is accepted while it equals the recorded token); time is the cost model's.

    das-rollout record --num-prompts 32 --samples 8 --steps 4 --temperature 0.6 \\
        --max-tokens 512 --output rl_t06.parquet
    python scripts/bench_policy_ceiling.py --trace rl_t06.parquet
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from das import methods
from das.config import DASConfig
from das.drafter import DASDrafter
from policies.budget import (
    BatchView,
    BudgetPolicy,
    makespan_budgets,
    predicted_remaining_tokens,
)
from policies.cost_model import StepCostModel, parse_cost_spec
from rollouts.replay import StepResult, replay_step
from rollouts.trace import RolloutRecord, group_by_step, read_trace

logger = logging.getLogger("bench_policy_ceiling")

# The online fit of the live RL benchmark's DAS engine
# (benchmarks/results/rollout_cpu_sequential.json).
LIVE_CPU_COST = "0.0363,0.00078"
METHODS = ("none", "das_fixed", "das_policy", "makespan_predicted", "makespan_oracle")


class MakespanPolicy(BudgetPolicy):
    """:func:`makespan_budgets` with remaining lengths from ``remaining(batch)``."""

    def __init__(
        self, cost: StepCostModel, max_budget: int, remaining: Callable[[BatchView], np.ndarray]
    ) -> None:
        self.cost, self.max_budget, self.remaining = cost, max_budget, remaining

    def batch_budgets(self, batch: BatchView, cost: StepCostModel | None = None) -> np.ndarray:
        return makespan_budgets(
            batch.cumulative_probs,
            cost or self.cost,
            self.remaining(batch),
            context_tokens=batch.context_tokens,
            max_budget=self.max_budget,
            min_relative_gain=0.02,
        )


class OracleLengths:
    """A drafter wrapper that tells its policy each request's true remaining length.

    Request ids are the row indices ``replay_step`` gives; ``lengths`` are the step's recorded
    response lengths, set before each step.
    """

    def __init__(self, drafter: DASDrafter) -> None:
        self.drafter = drafter
        self.lengths = np.zeros(0, dtype=np.int64)
        self.generated: dict[Hashable, int] = {}
        self.current = np.zeros(0)

    def remaining(self, batch: BatchView) -> np.ndarray:
        return self.current

    def begin_step(self, step: int | None = None) -> int:
        self.generated.clear()
        return self.drafter.begin_step(step)

    def start_request(self, request_id: Hashable, prompt_tokens: Any, prompt_key: Any = None):
        self.generated[request_id] = 0
        return self.drafter.start_request(request_id, prompt_tokens, prompt_key)

    def propose(self, request_ids: Sequence[Hashable]) -> Any:
        self.current = np.array(
            [self.lengths[i] - self.generated[i] for i in request_ids], dtype=np.float64
        )
        return self.drafter.propose(request_ids)

    def extend_many(self, request_ids: Sequence[Hashable], tokens: Sequence[np.ndarray]) -> None:
        for request_id, produced in zip(request_ids, tokens, strict=True):
            self.generated[request_id] += len(produced)
        self.drafter.extend_many(request_ids, tokens)

    def finish_request(
        self, request_id: Hashable, finish_reason: str, stop_token_ids: Iterable[int] = ()
    ) -> None:
        self.drafter.finish_request(request_id, finish_reason, stop_token_ids)


def replay_method(
    method: str, steps: dict[int, list[RolloutRecord]], cost: StepCostModel, k: int
) -> list[StepResult]:
    """Replay every step of the trace in order with one drafter of ``method``."""
    settings = DASConfig(num_speculative_tokens=k, policy="cost_model")
    oracle = None
    if method == "none":
        drafter = None
    elif method in ("das_fixed", "das_policy"):
        name = "das_fixed" if method == "das_fixed" else "das_cost_model"
        drafter = methods.build_drafter(name, cost, k)
    elif method == "makespan_predicted":

        def predicted(batch: BatchView) -> np.ndarray:
            return predicted_remaining_tokens(batch.generated_tokens, batch.expected_lengths)

        drafter = DASDrafter(settings, policy=MakespanPolicy(cost, k, predicted), cost=cost)
    elif method == "makespan_oracle":
        oracle = OracleLengths(DASDrafter(settings, cost=cost))
        oracle.drafter.policy = MakespanPolicy(cost, k, oracle.remaining)
        drafter = oracle
    else:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    results = []
    for step in sorted(steps):
        if oracle is not None:
            oracle.lengths = np.array([r.num_response_tokens for r in steps[step]], np.int64)
        results.append(replay_step(step, steps[step], drafter, cost))
    return results


def summarise(runs: dict[str, list[StepResult]]) -> dict[str, dict[str, float]]:
    """Per method, steps 2.. against ``none``: iterations ratio and modelled speed-up."""
    base = runs["none"][1:]
    base_passes = sum(r.forward_passes for r in base)
    base_s = sum(r.modelled_s for r in base)
    summary = {}
    for method, results in runs.items():
        later = results[1:]
        summary[method] = {
            "iterations_vs_none": sum(r.forward_passes for r in later) / base_passes,
            "speedup_vs_none": base_s / sum(r.modelled_s for r in later),
            "draft_tokens": float(sum(r.draft_tokens for r in later)),
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout record trace")
    parser.add_argument(
        "--cost", default=LIVE_CPU_COST, help=f"step cost model (default: {LIVE_CPU_COST})"
    )
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/policy_ceiling_cpu.json")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.trace.is_file():
        parser.error(f"--trace {args.trace} does not exist (record one: see this script's doc)")
    cost = parse_cost_spec(args.cost)
    steps = group_by_step(read_trace(args.trace))
    if len(steps) < 2:
        parser.error(f"--trace {args.trace} has {len(steps)} step(s); the ratios need >= 2")
    runs = {m: replay_method(m, steps, cost, args.k) for m in tqdm(METHODS, desc="replay")}
    summary = summarise(runs)
    for method, row in summary.items():
        passes = [r.forward_passes for r in runs[method]]
        logger.info(
            "%-19s iterations per step %s  steps 2.. vs none: iterations %.2fx, "
            "modelled speed %.2fx, %d draft tokens",
            method,
            passes,
            row["iterations_vs_none"],
            row["speedup_vs_none"],
            row["draft_tokens"],
        )
    report = {
        "command": "python scripts/bench_policy_ceiling.py --trace " + str(args.trace),
        "cost_model": args.cost,
        "num_speculative_tokens": args.k,
        "steps": {
            method: [
                {
                    "step": r.step,
                    "decode_iterations": r.forward_passes,
                    "modelled_s": r.modelled_s,
                    "draft_tokens": r.draft_tokens,
                    "accepted_tokens": r.accepted_tokens,
                    "mean_accepted_len": r.mean_accepted_len,
                }
                for r in results
            ]
            for method, results in runs.items()
        },
        "summary_steps_2_on": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
