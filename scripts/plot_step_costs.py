"""Engine-step costs of a DAS method in a live run, with drafts and without, by batch size.

Reads a ``das-rollout run`` / ``scripts/bench_rollout.py`` JSON (which keeps each RL step's
engine-step observations), prints a table of mean step time per batch-size bin (steps that
verified drafts against steps that did not), and writes a scatter plot of every engine step::

    python scripts/plot_step_costs.py benchmarks/results/rollout_cpu_keyed_aa_fit.json \\
        --method das_policy --plot benchmarks/results/rollout_cpu_keyed_aa_fit_steps.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from das.bench.step_costs import bin_step_costs, concatenate_observations, format_step_costs

logger = logging.getLogger("plot_step_costs")


def plot(observations: list[dict], path: Path, title: str) -> None:
    """Step time against requests per step, one colour for drafted steps, one for plain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    data = concatenate_observations(observations)
    drafts, seconds = data["draft_tokens"], data["seconds"]
    requests = data["num_tokens"] - drafts
    for mask, label, colour in (
        (drafts == 0, "no drafts", "tab:blue"),
        (drafts > 0, "drafts", "tab:red"),
    ):
        axes.scatter(requests[mask], seconds[mask] * 1000, s=6, alpha=0.5, label=label, c=colour)
    axes.set_xlabel("requests in the engine step")
    axes.set_ylabel("engine step time (ms)")
    axes.set_title(title, fontsize="medium")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_json", type=Path, help="a das-rollout run JSON")
    parser.add_argument(
        "--method", default="das_policy", help="method to read (default: %(default)s)"
    )
    parser.add_argument("--plot", type=Path, help="write the scatter plot to this PNG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = json.loads(args.run_json.read_text())
    methods = report.get("methods", {})
    if args.method not in methods:
        parser.error(f"--method {args.method!r} is not in {args.run_json} (has {sorted(methods)})")
    observations = [
        s["cost_observations"] for s in methods[args.method]["steps"] if s.get("cost_observations")
    ]
    if not observations:
        parser.error(f"{args.run_json} keeps no engine-step observations for {args.method!r}")
    logger.info("%s, %s: %d RL steps", args.run_json, args.method, len(observations))
    logger.info("%s", format_step_costs(bin_step_costs(observations)))
    if args.plot:
        plot(observations, args.plot, f"{args.method}: engine steps ({args.run_json.name})")
        logger.info("wrote %s", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
