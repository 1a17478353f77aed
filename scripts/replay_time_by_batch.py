"""Where a replayed step's time goes: modelled seconds and passes per band of running requests.

A step of RL rollouts starts with every request running and ends with a few long ones; the
drafting policy matters differently in each phase. This replays a trace (``das-rollout replay``'s
engine model and cost models) and splits each method's modelled time, forward passes and draft
tokens, over the steps from ``--from-step`` on, by the number of requests decoding in the pass.

    python scripts/replay_time_by_batch.py TRACE --json benchmarks/results/X.json --plot X.png
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import numpy as np

from das.atomic_json import write_json_atomically
from das.bench.batch_bands import band_labels, band_of
from das.bench.replay_report import compare_methods
from das.cli.replay import default_cost_specs, parse_cost_models
from rollouts.replay import ReplayConfig
from rollouts.trace import read_trace

logger = logging.getLogger(__name__)


def split_by_band(shapes, seconds: np.ndarray) -> list[dict[str, float]]:
    """Passes, modelled seconds and draft tokens of each band of ``shapes.num_requests``."""
    band = band_of(shapes.num_requests)
    rows = []
    for index in range(len(band_labels())):
        mask = band == index
        rows.append(
            {
                "passes": int(mask.sum()),
                "seconds": float(seconds[mask].sum()),
                "draft_tokens": int(shapes.draft_tokens[mask].sum()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--methods", default="none,suffix_global,das_fixed,das_cost_model")
    parser.add_argument("--cost", action="append", default=None, help="as das-rollout replay")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=ReplayConfig().max_num_seqs)
    parser.add_argument("--from-step", type=int, default=1, help="first step counted (index)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    costs = parse_cost_models(args.cost or default_cost_specs())
    records = read_trace(args.trace)
    methods = args.methods.split(",")
    comparison = compare_methods(
        records,
        methods,
        costs,
        num_speculative_tokens=args.k,
        progress=False,
        config=ReplayConfig(max_num_seqs=args.max_num_seqs),
    )
    labels = band_labels()
    report: dict = {
        "command": "python scripts/replay_time_by_batch.py " + shlex.join(sys.argv[1:]),
        "trace": args.trace.name,
        "from_step": args.from_step,
        "bands": labels,
        "cost_models": {},
    }
    for cost_name, cost in costs.items():
        per_method = {}
        for method in methods:
            totals = [{"passes": 0, "seconds": 0.0, "draft_tokens": 0} for _ in labels]
            for result in comparison.results[cost_name][method]:
                if result.step < args.from_step:
                    continue
                seconds = np.asarray(cost.times(result.shapes))
                for total, row in zip(totals, split_by_band(result.shapes, seconds), strict=True):
                    for key, value in row.items():
                        total[key] += value
            per_method[method] = dict(zip(labels, totals, strict=True))
        report["cost_models"][cost_name] = per_method
        print(f"\ncost model {cost_name}: modelled s / passes per band of decoding requests")
        print(f"{'method':<16}" + "".join(f"{label:>18}" for label in labels) + f"{'total s':>10}")
        for method, bands in per_method.items():
            cells = "".join(
                f"{bands[label]['seconds']:>10.1f} /{bands[label]['passes']:>6}" for label in labels
            )
            total = sum(b["seconds"] for b in bands.values())
            print(f"{method:<16}{cells}{total:>10.1f}")
    if args.json:
        write_json_atomically(report, args.json, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = report["cost_models"]
    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4), squeeze=False)
    for ax, (cost_name, per_method) in zip(axes[0], costs.items(), strict=True):
        methods = list(per_method)
        bottom = np.zeros(len(methods))
        for label in report["bands"]:
            heights = np.array([per_method[m][label]["seconds"] for m in methods])
            ax.bar(methods, heights, bottom=bottom, label=f"{label} requests")
            bottom += heights
        ax.set_title(f"{cost_name}: modelled seconds, steps from {report['from_step'] + 1}")
        ax.tick_params(axis="x", rotation=20)
    axes[0][-1].legend(
        title="decoding requests", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
