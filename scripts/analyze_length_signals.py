"""Which rollouts end an RL step, and can a live engine tell early? Measured on a recorded trace.

A step lasts until its slowest rollout finishes; on the RL workload those are the responses cut
at the token cap. A makespan-aware draft policy pays off only if it can single them out while
the batch is still large (``scripts/bench_policy_ceiling.py``: with their true lengths it cuts
iterations by 30%; with lengths predicted from history and age, by 3%). This prints and writes
what the signals a live engine has say (:mod:`rollouts.length_signals`): the prompt's earlier
truncated share, the request's own repetition, and its age::

    python scripts/analyze_length_signals.py --trace ~/.cache/das/traces/gsm8k_t06.parquet

(the trace: ``das-rollout record --num-prompts 64 --samples 8 --steps 4 --temperature 0.6
--max-tokens 512``). Writes JSON (``--json``) and a PNG next to it (or ``--plot``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from das.atomic_json import write_json_atomically
from rollouts.length_signals import (
    AliveRow,
    is_truncated,
    repetition_detector,
    truncation_by_history,
    truncation_given_alive,
)
from rollouts.trace import read_trace

logger = logging.getLogger("analyze_length_signals")

WINDOWS = (8, 16, 32)
AGES = (32, 64, 100, 150, 200, 250, 300, 350, 400, 450)


def plot(rows: list[AliveRow], overall: float, window: int, path: Path, title: str) -> None:
    """PNG: truncated share of the rollouts still running at each age, by repetition so far."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    ages = [row.age for row in rows]
    axes.plot(ages, [row.truncated_share for row in rows], "o-", label="all still running")
    axes.plot(
        ages,
        [row.repeated_truncated_share for row in rows],
        "s--",
        label=f"output repeated a {window}-token span",
    )
    axes.plot(ages, [row.not_repeated_truncated_share for row in rows], "^:", label="not repeated")
    axes.axhline(overall, color="grey", linewidth=0.8, label="all rollouts")
    axes.set_xlabel("tokens generated so far")
    axes.set_ylabel("share that will be truncated")
    axes.set_ylim(0, 1)
    axes.legend(fontsize="small")
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout record trace")
    parser.add_argument(
        "--window", type=int, default=16, help="repetition span for the by-age table and plot"
    )
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/length_signals_cpu.json")
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.trace.is_file():
        parser.error(f"--trace {args.trace} does not exist (record one: see this script's doc)")
    if args.window <= 0:
        parser.error(f"--window {args.window} must be a positive integer")
    records = read_trace(args.trace)
    if not records:
        parser.error(f"--trace {args.trace} holds no rollouts")
    overall = float(np.mean([is_truncated(r) for r in records]))
    logger.info("%d rollouts, %.1f%% truncated at the token cap", len(records), 100 * overall)

    history = truncation_by_history(records)
    logger.info("truncated share by the prompt's truncated share in earlier steps:")
    for row in history:
        closing = "]" if row.high >= 1.0 else ")"
        span = "= 0     " if row.high <= 1e-6 else f"[{row.low:.3f}, {row.high:.3f}{closing}"
        logger.info(
            "  earlier share %-14s %4d rollouts, %.2f truncated",
            span,
            row.rollouts,
            row.truncated_share,
        )

    detectors = [repetition_detector(records, window) for window in WINDOWS]
    logger.info("flag 'output repeated a W-token span' as a truncation predictor:")
    for score in detectors:
        logger.info(
            "  W=%2d: precision %.2f, recall %.2f, flagged %d tokens before the cap (median)",
            score.window,
            score.precision,
            score.recall,
            score.median_tokens_after_flag,
        )

    alive = truncation_given_alive(records, AGES, args.window)
    logger.info("of the rollouts still running after t tokens, the share truncated:")
    logger.info("      t  alive   all | repeated  share | not repeated  share")
    for row in alive:
        logger.info(
            "  %5d  %5d  %.2f | %8d  %.2f | %12d  %.2f",
            row.age,
            row.alive,
            row.truncated_share,
            row.repeated,
            row.repeated_truncated_share,
            row.not_repeated,
            row.not_repeated_truncated_share,
        )

    report = {
        "command": (
            f"python scripts/analyze_length_signals.py --trace {args.trace} --json {args.json}"
        ),
        "num_rollouts": len(records),
        "truncated_share": overall,
        "by_prompt_history": [row.to_dict() for row in history],
        "repetition_detectors": [score.to_dict() for score in detectors],
        "by_age": {"window": args.window, "rows": [row.to_dict() for row in alive]},
    }
    write_json_atomically(report, args.json)
    plot_path = args.plot or args.json.with_suffix(".png")
    plot(alive, overall, args.window, plot_path, f"{args.trace.name}: who runs to the cap")
    logger.info("wrote %s and %s", args.json, plot_path)
    return report


if __name__ == "__main__":
    main()
