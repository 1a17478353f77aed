"""How far any budget policy could take DAS's drafter on a trace: a replay ceiling.

An RL step lasts as many iterations as its slowest request takes. This benchmark replays one
trace with the same drafter under several budget policies, in one run, under one step cost
model, next to the baselines the targets are stated against:

* ``none``: no speculation (the baseline of every ratio);
* ``suffix_global``: the vLLM-suffix-like global tree at a fixed K;
* ``das_fixed``: every request drafts up to K (the most a policy can draft);
* ``das_policy``: DAS's cost-model policy (expected tokens per second of each step);
* ``makespan_predicted``: :func:`policies.budget.makespan_budgets` with the remaining lengths
  a live engine can predict (prompt history and age, :func:`predicted_remaining_tokens`);
* ``makespan_oracle``: the same objective given each request's true remaining length, which
  only a replay knows: the ceiling of any length predictor;
* ``oracle_drafts``: ``das_fixed``'s drafts cut to the prefix the trace accepts, as a policy
  that knew every draft's fate would verify them. It runs ``das_fixed``'s iterations without
  one wasted draft token, so no budget policy over this drafter's drafts can beat its time by
  more than what idling a draft that would be accepted saves;
* ``oracle_sources``: as ``oracle_drafts``, but each request verifies the draft, of the three
  DAS sources (prompt history, global tree, own text), that the trace accepts furthest: the
  ceiling of any rule for choosing among those drafts, with any budget policy;
* ``oracle_trees``: as ``oracle_sources``, but each source's draft is whatever its tree holds of
  the trace's next tokens after some suffix of the context, through any branch, not only the
  most frequent one (within the bounds of a draft from that match: K, the factor, the depth):
  the ceiling of tree-shaped drafts of any width from these trees. Its passes are priced with
  the accepted tokens only, as the other oracles' are, so it is a floor under such drafts'
  time, which would also pay for every branch verified;
* ``das_tree_drafts``: not an oracle: ``das_policy``, but in batches of at most 32 requests
  each request verifies a tree of up to 16 nodes (``--tree-nodes``): the most probable
  positions below its best match, as many as the cost-model objective buys, priced node by
  node (:class:`das.bench.tree_drafts.TreeDraftDrafter`). What verifying trees, which vLLM
  0.32 does not, would be worth;
* ``das_merged_tree_drafts``: as ``das_tree_drafts``, but each tree holds the most probable
  paths below every match of the context, not only below the one whose tree sums highest.

Every DAS drafter here drafts with the ``max_spec_factor`` the cost-model policy uses under the
cost model given (:meth:`das.config.DASConfig.spec_factor_for`), so that ``das_fixed`` and the
oracles choose among the drafts the policy sees.

It prints, per method, the iterations and modelled time of steps 2.. against ``none`` (and the
time against ``suffix_global``), the slowest request of each step, and writes JSON (and with
``--plot`` a bar chart). Iterations are exact under the replay's acceptance model (a draft
token is accepted while it equals the recorded token); time is the cost model's.

    das-rollout record --num-prompts 32 --samples 8 --steps 4 --temperature 0.6 \\
        --max-tokens 512 --output rl_t06.parquet
    python scripts/bench_policy_ceiling.py --trace rl_t06.parquet --cost h100
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from das import methods
from das.atomic_json import write_json_atomically
from das.bench import script_args
from das.bench.trace_oracle import OracleSourceDrafter, OracleTreeDrafter, TraceView
from das.bench.tree_drafts import TreeDraftDrafter
from das.config import DASConfig
from das.drafter import DASDrafter
from policies.budget import (
    BatchView,
    BudgetPolicy,
    makespan_budgets,
    predicted_remaining_tokens,
)
from policies.cost_model import StepCostModel
from policies.profiles import (
    TABLE_PROFILES,
    CostModel,
    policy_cost_model,
)
from policies.step_shapes import StepShapes
from rollouts.replay import StepResult, replay_step
from rollouts.trace import RolloutRecord

logger = logging.getLogger("bench_policy_ceiling")

# The online fit of the live RL benchmark's DAS engine
# (benchmarks/results/rollout_cpu_sequential.json).
LIVE_CPU_COST = "0.0363,0.00078"
TREE_NODES = 16  # the most nodes of a request's tree in das_tree_drafts
MAX_DEPTH = DASConfig.max_depth  # the drafter's default depth bound
K = DASConfig.num_speculative_tokens  # the drafter's default K
METHODS = (
    "none",
    "suffix_global",
    "das_fixed",
    "das_policy",
    "makespan_predicted",
    "makespan_oracle",
    "oracle_drafts",
    "oracle_sources",
    "oracle_trees",
    "das_tree_drafts",
    "das_merged_tree_drafts",
)


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


def replay_method(
    method: str,
    steps: dict[int, list[RolloutRecord]],
    cost: CostModel,
    k: int,
    tree_nodes: int = TREE_NODES,
    max_depth: int = MAX_DEPTH,
) -> tuple[list[StepResult], list[dict[str, Any]]]:
    """Replay every step of the trace in order with one drafter of ``method``, priced by
    ``cost`` (a policy plans with :func:`~policies.profiles.policy_cost_model` of it);
    the tree drafters verify trees of up to ``tree_nodes`` nodes, and every suffix tree,
    the global tree's too, is bounded at ``max_depth``.

    Returns the step results and, per step, the slowest request (its row, forward passes,
    tokens, rejected draft tokens, and its passes priced alone) and the draft tokens rejected
    in the requests that ran to the token cap.
    """
    plan = policy_cost_model(cost)
    # Lookups free, as in every replay: a drafter timing its own lookups would skip batches by
    # the machine's clock, and the modelled times would depend on the machine's load.
    settings = DASConfig(
        num_speculative_tokens=k,
        policy="cost_model",
        lookup_us_per_request=0.0,
        max_depth=max_depth,
    )
    spec_factor = settings.spec_factor_for(plan.knee_tokens)  # what das_policy drafts with
    if method == "none":
        view = None
    elif method in ("suffix_global", "das_fixed", "das_policy", "oracle_drafts"):
        name = {"das_policy": "das_cost_model", "oracle_drafts": "das_fixed"}.get(method, method)
        factor = {} if method == "suffix_global" else {"max_spec_factor": spec_factor}
        view = TraceView(
            methods.build_drafter(name, plan, k, max_depth=max_depth, **factor),
            cut_drafts=method == "oracle_drafts",
        )
    elif method == "makespan_predicted":

        def predicted(batch: BatchView) -> np.ndarray:
            return predicted_remaining_tokens(batch.generated_tokens, batch.expected_lengths)

        view = TraceView(DASDrafter(settings, policy=MakespanPolicy(plan, k, predicted), cost=plan))
    elif method in ("oracle_sources", "oracle_trees"):
        fixed = dataclasses.replace(settings, policy="fixed", max_spec_factor=spec_factor)
        oracle = OracleSourceDrafter if method == "oracle_sources" else OracleTreeDrafter
        view = TraceView(oracle(fixed), cut_drafts=True)
    elif method in ("das_tree_drafts", "das_merged_tree_drafts"):
        linear = methods.build_drafter("das_cost_model", plan, k, max_depth=max_depth)
        view = TraceView(
            TreeDraftDrafter(
                linear.config,
                policy=linear.policy,
                cost=plan,
                max_nodes=tree_nodes,
                merge_matches=method == "das_merged_tree_drafts",
            )
        )
    elif method == "makespan_oracle":
        view = TraceView(DASDrafter(settings, cost=plan))
        view.drafter.policy = MakespanPolicy(plan, k, view.remaining)
    else:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    results, details = [], []
    for step in sorted(steps):
        records = steps[step]
        if view is not None:
            view.set_step(records)
        results.append(replay_step(step, records, view, cost))
        if view is None:
            row = int(np.argmax([r.num_response_tokens for r in records]))
            passes = records[row].num_response_tokens
        else:
            row, passes = max(view.passes.items(), key=lambda item: item[1])
        record = records[row]
        rejected = view.rejected if view is not None else dict.fromkeys(range(len(records)), 0)
        capped = [i for i, r in enumerate(records) if r.finish_reason == "length"]
        details.append(
            {
                "slowest_request": {
                    "row": int(row),
                    "passes": int(passes),
                    "tokens": record.num_response_tokens,
                    "rejected_draft_tokens": rejected[row],
                    "alone_s": alone_time(cost, int(passes), record),
                },
                "requests_at_the_cap": len(capped),
                "rejected_draft_tokens_at_the_cap": sum(rejected[i] for i in capped),
            }
        )
    return results, details


def alone_time(cost: CostModel, passes: int, record: RolloutRecord) -> float:
    """Modelled time of ``passes`` forward passes of ``record`` alone, one token each: what its
    passes cost if every other request of the step were free (its context grows evenly from
    the prompt to the whole response over the passes)."""
    ones = np.ones(passes, np.int64)
    context = record.num_prompt_tokens + np.linspace(0, record.num_response_tokens, passes).astype(
        np.int64
    )
    none = np.zeros(passes, np.int64)
    shapes = StepShapes(
        num_tokens=ones,
        draft_tokens=none,
        num_requests=ones,
        kv_tokens=context,
        context_tokens=context,
        prefill_tokens=none,
    )
    return float(cost.times(shapes).sum())


def summarise(
    runs: dict[str, list[StepResult]], details: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, float]]:
    """Per method, steps 2.. against ``none``: iterations, time, the worst step's time, and
    what the slowest request of each step costs alone (a floor under any step time)."""
    base = runs["none"][1:]
    base_passes = sum(r.forward_passes for r in base)
    base_s = sum(r.modelled_s for r in base)
    suffix_s = sum(r.modelled_s for r in runs["suffix_global"][1:])
    summary = {}
    for method, results in runs.items():
        later = results[1:]
        summary[method] = {
            "iterations_vs_none": sum(r.forward_passes for r in later) / base_passes,
            "speedup_vs_none": base_s / sum(r.modelled_s for r in later),
            "time_vs_none": sum(r.modelled_s for r in later) / base_s,
            "time_vs_suffix_global": sum(r.modelled_s for r in later) / suffix_s,
            "slowest_request_alone_vs_none": sum(
                d["slowest_request"]["alone_s"] for d in details[method][1:]
            )
            / base_s,
            "slowest_step_time_vs_none": max(
                r.modelled_s / b.modelled_s for r, b in zip(later, base, strict=True)
            ),
            "draft_tokens": float(sum(r.draft_tokens for r in later)),
        }
    return summary


def plot_ceiling(runs: dict[str, list[StepResult]], title: str, path: Path) -> None:
    """Bars of each step's modelled time against ``none``, per method (steps 2..)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = runs["none"][1:]
    names = [name for name in runs if name != "none"]
    width = 0.8 / max(1, len(base))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for index, step in enumerate(base):
        ratios = [runs[name][index + 1].modelled_s / step.modelled_s for name in names]
        ax.bar(
            np.arange(len(names)) + (index - (len(base) - 1) / 2) * width,
            ratios,
            width,
            label=f"step {step.step + 1}",
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylabel("modelled step time / no speculation")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout record trace")
    parser.add_argument(
        "--cost",
        default=LIVE_CPU_COST,
        help=f"step cost model: 'cpu' (this project's measured CPU curve), a measured table "
        f"name ({', '.join(TABLE_PROFILES)}), a profile file or 'c_base,c_tok[,...]' "
        f"(default: {LIVE_CPU_COST}, the live CPU fit)",
    )
    parser.add_argument("--k", type=int, default=K, help=f"num_speculative_tokens (default {K})")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods to replay, none and suffix_global among them (default: all)",
    )
    parser.add_argument(
        "--tree-nodes",
        type=int,
        default=TREE_NODES,
        help=f"the most nodes of a request's tree in das_tree_drafts (default {TREE_NODES})",
    )
    parser.add_argument(
        "--max-depth",
        type=int,
        default=MAX_DEPTH,
        help=f"depth bound of every suffix tree, the global tree's too (default {MAX_DEPTH})",
    )
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/policy_ceiling_cpu.json")
    )
    parser.add_argument("--plot", type=Path, help="write a bar chart of step times here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cost = script_args.cost_model(parser, args.cost)
    steps = script_args.trace_steps(
        parser, args.trace, min_steps=2, hint=" (record one: see this script's doc)"
    )
    if args.tree_nodes < 1:
        parser.error(f"--tree-nodes {args.tree_nodes} must be >= 1")
    if args.max_depth < 2:
        parser.error(f"--max-depth {args.max_depth} must be >= 2 (a match and a draft token)")
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not {"none", "suffix_global"} <= set(chosen):
        parser.error(
            f"--methods {args.methods}: each must be one of {', '.join(METHODS)}, "
            "and none and suffix_global must be among them (the ratios' baselines)"
        )
    replays = {
        m: replay_method(m, steps, cost, args.k, args.tree_nodes, args.max_depth)
        for m in tqdm([m for m in METHODS if m in chosen], desc="replay")
    }
    runs = {method: results for method, (results, _) in replays.items()}
    summary = summarise(runs, {method: rows for method, (_, rows) in replays.items()})
    for method, row in summary.items():
        passes = [r.forward_passes for r in runs[method]]
        logger.info(
            "%-19s iterations per step %s  steps 2.. vs none: iterations %.3fx, time %.3fx "
            "(worst step %.3fx; %.3fx suffix_global; slowest requests alone %.3fx), "
            "%d draft tokens",
            method,
            passes,
            row["iterations_vs_none"],
            row["time_vs_none"],
            row["slowest_step_time_vs_none"],
            row["time_vs_suffix_global"],
            row["slowest_request_alone_vs_none"],
            row["draft_tokens"],
        )
    report = {
        "command": f"python scripts/bench_policy_ceiling.py --trace {args.trace.name} "
        f"--cost {args.cost} --json {args.json.name}"
        + (f" --k {args.k}" if args.k != K else "")
        + (f" --max-depth {args.max_depth}" if args.max_depth != MAX_DEPTH else "")
        + (f" --methods {args.methods}" if set(chosen) != set(METHODS) else "")
        + (f" --tree-nodes {args.tree_nodes}" if args.tree_nodes != TREE_NODES else ""),
        "cost_model": args.cost,
        "num_speculative_tokens": args.k,
        "tree_nodes": args.tree_nodes,
        "max_depth": args.max_depth,
        "steps": {
            method: [
                {
                    "step": r.step,
                    "decode_iterations": r.forward_passes,
                    "modelled_s": r.modelled_s,
                    "draft_tokens": r.draft_tokens,
                    "accepted_tokens": r.accepted_tokens,
                    "mean_accepted_len": r.mean_accepted_len,
                    **detail,
                }
                for r, detail in zip(results, replays[method][1], strict=True)
            ]
            for method, results in runs.items()
        },
        "summary_steps_2_on": summary,
    }
    write_json_atomically(report, args.json)
    logger.info("wrote %s", args.json)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_ceiling(runs, f"{args.trace.name}, cost {args.cost}, K = {args.k}", args.plot)
        logger.info("wrote %s", args.plot)


if __name__ == "__main__":
    main()
