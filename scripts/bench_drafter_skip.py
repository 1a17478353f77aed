"""Drafter time with and without skipping lookups in batches where no draft could pay.

DAS's cost-model policy gives no budget in a large batch on a CPU (a draft token costs about
what a generated one does), yet the drafter used to look every request's drafts up in three
suffix trees first. Now it asks the policy first (:func:`policies.budget.drafting_can_pay`, an
exact bound) and skips the lookups when no draft could get a budget. This replays one recorded
trace twice with the same drafter settings and cost model, in one run:

* ``lookup_always``: the policy's bound disabled (every batch looked up, as before);
* ``skip``: the drafter as shipped.

The two take turns step by step (order reversed every step).

Both must produce the same iterations, drafts and accepted tokens (the script checks it); it
prints the drafter's wall time per step and the ratio, and writes JSON::

    python scripts/bench_drafter_skip.py --trace ~/.cache/das/traces/gsm8k_t06.parquet \\
        --json benchmarks/results/drafter_skip_cpu.json

The default cost is the online fit of the final live RL run's DAS engine
(``benchmarks/results/rollout_cpu.json``, steps 2-4: c_base 62-66 ms, c_tok 0.85-0.92 ms past
a 73-token knee).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from das import methods
from das.atomic_json import write_json_atomically
from policies.budget import BatchView, BudgetPolicy
from policies.cost_model import StepCostModel, parse_cost_spec
from rollouts.replay import StepResult, replay_step
from rollouts.trace import group_by_step, read_trace

logger = logging.getLogger("bench_drafter_skip")

LIVE_CPU_FIT = "0.066,0.0009,73"
VARIANTS = ("lookup_always", "skip")


class LookUpAlways(BudgetPolicy):
    """``policy``'s budgets, but never lets the drafter skip a lookup."""

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy

    def batch_budgets(self, batch: BatchView, cost: StepCostModel | None = None) -> np.ndarray:
        return self.policy.batch_budgets(batch, cost)


def build(variant: str, cost: StepCostModel, k: int):
    """A DAS cost-model drafter of ``variant``."""
    drafter = methods.build_drafter("das_cost_model", cost, k)
    if variant == "lookup_always":
        drafter.policy = LookUpAlways(drafter.policy)
    elif variant != "skip":
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
    return drafter


def replay(steps: dict, cost: StepCostModel, k: int) -> dict[str, list[StepResult]]:
    """Every step of the trace on one drafter per variant, the variants taking turns (order
    reversed every step) so that the machine's drift falls on both."""
    drafters = {variant: build(variant, cost, k) for variant in VARIANTS}
    runs: dict[str, list[StepResult]] = {variant: [] for variant in VARIANTS}
    for index, step in enumerate(sorted(steps)):
        order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            runs[variant].append(replay_step(step, steps[step], drafters[variant], cost))
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout record trace")
    parser.add_argument("--num-prompts", type=int, default=32, help="first N prompts (0: all)")
    parser.add_argument("--cost", default=LIVE_CPU_FIT, help=f"cost spec (default {LIVE_CPU_FIT})")
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument("--json", type=Path, default=None, help="JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.trace.is_file():
        parser.error(f"--trace {args.trace} does not exist")
    if args.num_prompts < 0:
        parser.error(f"--num-prompts {args.num_prompts} must be >= 0")
    cost = parse_cost_spec(args.cost)
    records = read_trace(args.trace)
    if args.num_prompts:
        keep = sorted({r.prompt_index for r in records})[: args.num_prompts]
        records = [r for r in records if r.prompt_index in set(keep)]
    steps = group_by_step(records)
    runs = replay(steps, cost, args.k)
    for before, after in zip(runs["lookup_always"], runs["skip"], strict=True):
        same = (before.forward_passes, before.draft_tokens, before.accepted_tokens) == (
            after.forward_passes,
            after.draft_tokens,
            after.accepted_tokens,
        )
        if not same:
            raise AssertionError(f"step {before.step}: skipping lookups changed the replay")
    drafter_s = {v: [r.drafter_s for r in results] for v, results in runs.items()}
    ratio = sum(drafter_s["lookup_always"]) / sum(drafter_s["skip"])
    for index, result in enumerate(runs["skip"]):
        logger.info(
            "step %d: %d iterations, %d draft tokens; drafter %.2f s looking up always, "
            "%.2f s skipping",
            result.step,
            result.forward_passes,
            result.draft_tokens,
            drafter_s["lookup_always"][index],
            drafter_s["skip"][index],
        )
    logger.info("drafter time, lookup_always / skip: %.2fx (same drafts and iterations)", ratio)
    report = {
        "command": f"python scripts/bench_drafter_skip.py --trace {args.trace} "
        f"--num-prompts {args.num_prompts} --cost {args.cost} --k {args.k}",
        "drafter_s": drafter_s,
        "lookup_always_over_skip": ratio,
        "steps": [
            {
                "step": r.step,
                "decode_iterations": r.forward_passes,
                "draft_tokens": r.draft_tokens,
                "accepted_tokens": r.accepted_tokens,
            }
            for r in runs["skip"]
        ],
    }
    if args.json is not None:
        write_json_atomically(report, args.json)
        logger.info("wrote %s", args.json)
    return report


if __name__ == "__main__":
    main()
