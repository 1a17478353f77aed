"""Does prompt history survive a large dataset? Step-counting versus appearance-counting windows.

In a real RL run a prompt comes back once per epoch, tens of steps later, so a history window that
counts steps is empty by the time the prompt returns. This replays one recorded trace as if the
dataset held ``E`` times a step's prompts (:func:`rollouts.dataset_steps.spread_steps`: a prompt
returns every ``E`` steps with its whole sibling group) under three history rules, in one run:

* ``steps``: a prompt's history keeps the last ``window_steps`` steps (the former rule);
* ``appearances``: a prompt's history keeps its last ``window_appearances`` appearances, all
  prompts bounded by ``max_history_tokens`` (the least recently seen go first);
* ``appearances_small_budget``: the same with a token budget of a quarter of the trace's
  response tokens, so that the least-recently-seen eviction is exercised on a small trace;
* ``global_only``: no per-prompt history, only the global tree of the last ``window_steps`` steps
  (plus the request's own context; no live tokens of sibling samples either).

It reports accepted tokens, forward passes, the history's forest bytes and bytes per stored
token, prints the ratio of accepted tokens at the largest ``E`` to ``E = 1`` per rule, and writes
JSON and a PNG::

    python scripts/bench_history_window.py --trace tests/data/trace_small.parquet \\
        --json benchmarks/results/history_window_small.json

Forward passes depend on the batch (a step of ``E = 16`` holds 1/16 of the prompts), so compare
rules at one ``E``, and accepted tokens across ``E``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from das import methods
from das.atomic_json import write_json_atomically
from das.config import HISTORY_BYTES_PER_TOKEN, DASConfig
from policies.cost_model import StepCostModel
from policies.profiles import load_profile
from rollouts.dataset_steps import spread_steps
from rollouts.replay import replay_step
from rollouts.trace import group_by_step, read_trace
from suffix_tree import SuffixForest

logger = logging.getLogger("bench_history_window")

DEFAULT_TRACE = Path("tests/data/trace_small.parquet")
RULES = ("steps", "appearances", "appearances_small_budget", "global_only")


def rule_settings(rule: str, max_history_tokens: int, num_trace_tokens: int) -> dict:
    """DASConfig overrides of a rule."""
    if rule == "steps":
        return {"window_rule": "steps", "max_history_tokens": max_history_tokens}
    if rule == "appearances":
        return {"window_rule": "appearances", "max_history_tokens": max_history_tokens}
    if rule == "appearances_small_budget":
        return {"window_rule": "appearances", "max_history_tokens": num_trace_tokens // 4}
    if rule == "global_only":
        return {"use_prompt_history": False}
    raise ValueError(f"rule={rule!r} must be one of {RULES}")


def replay_rule(steps: dict, method: str, cost: StepCostModel, k: int, overrides: dict) -> dict:
    """Replay every step on one drafter; totals and the history's peak size."""
    drafter = methods.build_drafter(method, cost, k, **overrides)
    totals = {"accepted_tokens": 0, "forward_passes": 0, "draft_tokens": 0, "output_tokens": 0}
    peak = {"history_bytes": 0, "history_tokens": 0, "prompt_tokens": 0, "global_tokens": 0}
    drafter_s = 0.0
    for step in sorted(steps):
        result = replay_step(step, steps[step], drafter, cost)
        totals["accepted_tokens"] += result.accepted_tokens
        totals["forward_passes"] += result.forward_passes
        totals["draft_tokens"] += result.draft_tokens
        totals["output_tokens"] += result.output_tokens
        drafter_s += result.drafter_s
        stats = drafter.history.stats()
        if stats.memory_bytes >= peak["history_bytes"]:
            peak = {
                "history_bytes": stats.memory_bytes,
                "history_tokens": stats.num_tokens,
                "prompt_tokens": stats.num_prompt_tokens,
                "global_tokens": stats.num_global_tokens,
            }
    # Once per replay, on the final forest: the check walks every node in Python (minutes on a
    # forest of a million tokens), so after every step it would dominate a long trace's run.
    drafter.forest.check_integrity()
    memory = drafter.forest.memory()
    return {
        **totals,
        **peak,
        "bytes_per_token_at_peak": peak["history_bytes"] / max(1, peak["history_tokens"]),
        "final_live_nodes_per_token": memory.num_live_nodes / max(1, memory.num_stored_tokens),
        "final_prompt_trees": drafter.history.stats().num_prompt_trees,
        "draft_tokens_by_source": dict(drafter.stats.tokens_by_source),
        "drafter_s": drafter_s,
    }


def measure_bytes_per_token(records: list, num_copies: int, max_depth: int) -> dict:
    """Forest bytes per stored token at scale: ``num_copies`` copies of every response, token ids
    shifted per copy so that copies share no node (as distinct prompts' responses would not)."""
    forest = SuffixForest(max_depth=max_depth)
    shift = 1 + max(int(r.response_tokens.max(initial=0)) for r in records)
    for copy in range(num_copies):
        for index, record in enumerate(records):
            shifted = record.response_tokens.astype(np.int64) + copy * shift
            forest.append((copy, index), shifted, tree=(record.prompt_key, copy))
    memory = forest.memory()
    return {
        "num_stored_tokens": memory.num_stored_tokens,
        "total_bytes": memory.total,
        "bytes_per_token": memory.bytes_per_token,
        "live_nodes_per_token": memory.num_live_nodes / max(1, memory.num_stored_tokens),
        "bytes_by_part": {
            "nodes": memory.nodes,
            "edges": memory.edges,
            "tokens": memory.tokens,
            "sequences": memory.sequences,
        },
    }


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods_run = list(report["results"])
    figure, axes = plt.subplots(1, len(methods_run) + 1, figsize=(5.5 * (len(methods_run) + 1), 4))
    for axis, method in zip(axes, methods_run, strict=False):
        for rule, rows in report["results"][method].items():
            values = [row["dataset_steps"] for row in rows]
            axis.plot(values, [row["accepted_tokens"] for row in rows], marker="o", label=rule)
        axis.set_title(f"{method}: accepted draft tokens")
    for rule, rows in report["results"][methods_run[0]].items():
        values = [row["dataset_steps"] for row in rows]
        axes[-1].plot(
            values, [row["history_bytes"] / 2**20 for row in rows], marker="o", label=rule
        )
    axes[-1].set_title(f"{methods_run[0]}: history forest, peak MiB")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("dataset steps E (a prompt returns every E steps)")
        axis.legend(fontsize=8)
    figure.suptitle(f"history windows on {report['trace']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="a das-rollout trace")
    parser.add_argument(
        "--dataset-steps", default="1,4,16", help="comma-separated E values (default 1,4,16)"
    )
    parser.add_argument(
        "--methods",
        default="das_cost_model,das_prompt_only",
        help="comma-separated das.methods methods (default das_cost_model,das_prompt_only)",
    )
    parser.add_argument("--cost", default="h100_7b", help="cost profile or spec (h100_7b)")
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument(
        "--max-history-tokens",
        type=int,
        default=DASConfig().max_history_tokens,
        help="token budget of the steps and appearances rules (default: DASConfig's)",
    )
    parser.add_argument(
        "--fill-copies",
        type=int,
        default=40,
        help="copies of the trace's responses in the bytes-per-token fill (default 40)",
    )
    parser.add_argument("--json", type=Path, default=None, help="JSON to write (PNG beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.trace.is_file():
        parser.error(f"--trace {args.trace} does not exist")
    method_names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in method_names:
        if method not in methods.METHODS or not method.startswith("das_"):
            parser.error(f"--methods: {method} must be a das_* method of das.methods")
    dataset_steps = [int(v) for v in args.dataset_steps.split(",")]
    cost = load_profile(args.cost)
    records = read_trace(args.trace)
    num_trace_tokens = sum(r.num_response_tokens for r in records)
    recorded = group_by_step(records)
    results: dict[str, dict[str, list[dict]]] = {m: {} for m in method_names}
    for value in dataset_steps:
        steps = spread_steps(recorded, value)
        for method in method_names:
            for rule in RULES:
                if rule == "global_only" and method == "das_prompt_only":
                    continue  # that method drafts from prompt history only
                settings = rule_settings(rule, args.max_history_tokens, num_trace_tokens)
                row = {"dataset_steps": value, **replay_rule(steps, method, cost, args.k, settings)}
                results[method].setdefault(rule, []).append(row)
                logger.info(
                    "E=%-3d %-15s %-25s accepted %6d  passes %6d  history %6.2f MiB peak "
                    "(%7d tokens, %5.1f B/token)",
                    value,
                    method,
                    rule,
                    row["accepted_tokens"],
                    row["forward_passes"],
                    row["history_bytes"] / 2**20,
                    row["history_tokens"],
                    row["bytes_per_token_at_peak"],
                )
    kept = {
        method: {
            rule: rows[-1]["accepted_tokens"] / max(1, rows[0]["accepted_tokens"])
            for rule, rows in by_rule.items()
        }
        for method, by_rule in results.items()
    }
    for method, by_rule in kept.items():
        for rule, ratio in by_rule.items():
            logger.info(
                "%s %s: accepted tokens at E=%d / E=%d = %.2f",
                method,
                rule,
                dataset_steps[-1],
                dataset_steps[0],
                ratio,
            )
    defaults = DASConfig()
    fill = measure_bytes_per_token(records, args.fill_copies, defaults.max_depth)
    budget_tokens = defaults.max_history_tokens + defaults.max_global_tokens
    logger.info(
        "bytes per stored token at %.1f M tokens: %.1f (config constant %d); budgets of %.1f M "
        "tokens hold %.2f GiB",
        fill["num_stored_tokens"] / 1e6,
        fill["bytes_per_token"],
        HISTORY_BYTES_PER_TOKEN,
        budget_tokens / 1e6,
        budget_tokens * fill["bytes_per_token"] / 2**30,
    )
    report = {
        "command": f"python scripts/bench_history_window.py --trace {args.trace} "
        f"--dataset-steps {args.dataset_steps} --methods {args.methods} --cost {args.cost} "
        f"--k {args.k} --max-history-tokens {args.max_history_tokens} "
        f"--fill-copies {args.fill_copies}",
        "trace": str(args.trace),
        "num_trace_response_tokens": num_trace_tokens,
        "settings": {
            "window_steps": defaults.window_steps,
            "window_appearances": defaults.window_appearances,
            "max_history_tokens": args.max_history_tokens,
            "small_budget_tokens": num_trace_tokens // 4,
            "max_global_tokens": defaults.max_global_tokens,
        },
        "bytes_per_token_fill": fill,
        "default_budget_gib": budget_tokens * fill["bytes_per_token"] / 2**30,
        "results": results,
        "accepted_kept_largest_over_smallest_e": kept,
    }
    if args.json is not None:
        write_json_atomically(report, args.json)
        logger.info("wrote %s and %s", args.json, plot(report, args.json.with_suffix(".png")))
    return report


if __name__ == "__main__":
    main()
