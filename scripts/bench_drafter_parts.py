"""Where a drafter's time per pass goes: its calls and their main parts, for one replayed step.

``scripts/bench_drafter_time.py`` times a drafter's calls per pass; this splits them. It
replays the trace's first step to fill the history, then one step (``--step``, default the
second) with each method in turn, timing the drafter's public calls (``propose``,
``extend_many``, ``start_request``, ``finish_request``) and, inside them, the suffix forest's
lookups and appends, the budget policy's bound and budgets, the scoring of the last drafts
against what the target produced, and the stats counting. Reports seconds and microseconds
per pass, per method, and writes JSON.

    python scripts/bench_drafter_parts.py --trace TRACE --json benchmarks/results/drafter_parts.json

Times are this machine's wall times (name the CPU with every figure); the parts of a call are
timed inside it, so they sum to less than the call.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from das import methods
from das.atomic_json import write_json_atomically
from das.bench import script_args
from das.vllm.engine import cpu_description
from policies.profiles import policy_cost_model
from rollouts.replay import replay_step

logger = logging.getLogger("bench_drafter_parts")

CALLS = ("propose", "extend_many", "start_request", "finish_request")
# (where, attribute, label) of the parts timed inside the calls; "drafter" is the drafter
# itself, "forest" its suffix forest, "policy" its budget policy (absent for fixed budgets).
PARTS = (
    ("forest", "speculate_many", "tree lookups"),
    ("forest", "append_many", "tree appends"),
    ("policy", "may_draft", "policy bound"),
    ("policy", "batch_budgets", "policy budgets"),
    ("drafter", "_resolve_pending", "scoring the last drafts"),
    ("drafter", "_count", "stats counting"),
)


class TimedPolicy:
    """Forwards to a budget policy, timing its methods named in :data:`PARTS`."""

    def __init__(self, policy: Any, timed: Callable[[str, Callable], Callable]) -> None:
        self._policy = policy
        for where, name, label in PARTS:
            if where == "policy":
                setattr(self, name, timed(label, getattr(policy, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


def time_parts(drafter: Any) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap ``drafter``'s calls and parts in timers; returns the (seconds, calls) it fills."""
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(label: str, function: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - started
                calls[label] += 1

        return wrapper

    for name in CALLS:
        setattr(drafter, name, timed(name, getattr(drafter, name)))
    for where, name, label in PARTS:
        if where == "policy":
            continue
        owner = drafter.forest if where == "forest" else drafter
        setattr(owner, name, timed(label, getattr(owner, name)))
    if drafter.policy is not None:
        drafter.policy = TimedPolicy(drafter.policy, timed)
    return seconds, calls


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout trace")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["das_cost_model", "suffix_global"],
        choices=[m for m in methods.METHODS if m not in ("none", "ngram")],
        help="drafting methods to split (default: das_cost_model suffix_global)",
    )
    parser.add_argument("--step", type=int, default=2, help="1-based index of the step timed")
    parser.add_argument("--cost", default="h100", help="step cost model (default: h100 table)")
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cost = script_args.cost_model(parser, args.cost)
    steps = script_args.trace_steps(parser, args.trace)
    keys = sorted(steps)
    if not 2 <= args.step <= len(keys):
        parser.error(f"--step {args.step}: the trace has steps 1-{len(keys)}; give 2 or more")
    plan = policy_cost_model(cost)
    report: dict[str, Any] = {
        "command": f"python scripts/bench_drafter_parts.py --trace {args.trace.name} "
        f"--methods {' '.join(args.methods)} --step {args.step} --cost {args.cost} --k {args.k}",
        "trace": args.trace.name,
        "cpu": cpu_description(),
        "methods": {},
    }
    for method in args.methods:
        drafter = methods.build_drafter(method, plan, args.k)
        for key in keys[: args.step - 1]:  # history, untimed
            replay_step(key, steps[key], drafter, cost)
        seconds, calls = time_parts(drafter)
        result = replay_step(keys[args.step - 1], steps[keys[args.step - 1]], drafter, cost)
        passes = calls["propose"]
        per_pass = 1 / max(passes, 1)
        rows = int(result.shapes.num_requests.sum())
        report["methods"][method] = {
            "passes": passes,
            "mean_decoding_requests": rows * per_pass,
            "seconds": dict(seconds),
            "us_per_pass": {label: s * per_pass * 1e6 for label, s in seconds.items()},
        }
        logger.info("%s: %d passes, %.1f requests per pass", method, passes, rows * per_pass)
        for label, value in sorted(seconds.items(), key=lambda item: -item[1]):
            logger.info("  %-26s %7.3f s %8.1f us/pass", label, value, value * per_pass * 1e6)
    if args.json:
        write_json_atomically(report, args.json)
        logger.info("wrote %s", args.json)
    return report


if __name__ == "__main__":
    main()
