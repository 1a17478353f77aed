"""Reliability calibration A/B: the cost-model policy with and without the acceptance map.

Replays one trace with ``das_cost_model`` twice per cost model, in one run: with the
(source, match-length) factors alone (A) and with the reliability map on top (B,
``reliability_calibration=true``), next to no speculation. It prints each step's modelled
time against none and B's time against A's, and records the reliability of A's predictions:
per bin of predicted cumulative acceptance, how often the draft prefix up to that position was
accepted. Writes JSON and, with ``--plot``, the reliability curves of A and of B's policy inputs
against the diagonal.

    python scripts/bench_reliability.py --trace ~/.cache/das/traces/longtail_t06_m2048.parquet \\
        --json benchmarks/results/reliability_longtail_smollm.json \\
        --plot benchmarks/results/reliability_longtail_smollm.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from das.atomic_json import write_json_atomically
from das.bench import script_args
from das.drafter import DASDrafter
from das.methods import build_drafter
from das.reliability import NUM_BINS, ReliabilityCalibration
from policies.profiles import policy_cost_model
from rollouts.replay import replay_step

logger = logging.getLogger("bench_reliability")
VARIANTS = {"factors": False, "factors+map": True}


class OutcomeLog:
    """Undecayed counts, per bin of what the policy was shown, of accepted draft prefixes."""

    def __init__(self) -> None:
        self.tried = np.zeros(NUM_BINS)
        self.accepted = np.zeros(NUM_BINS)
        self.predicted = np.zeros(NUM_BINS)

    def add(self, shown: np.ndarray, num_accepted: int) -> None:
        bins = ReliabilityCalibration.bins(shown)
        np.add.at(self.tried, bins, 1.0)
        np.add.at(self.predicted, bins, shown)
        np.add.at(self.accepted, bins[:num_accepted], 1.0)

    def calibration_error(self) -> float:
        """Mean |predicted - observed| over every draft position, by bin (the expected
        calibration error)."""
        return float(np.abs(self.predicted - self.accepted).sum() / max(self.tried.sum(), 1))

    def to_dict(self) -> dict[str, object]:
        tried = np.maximum(self.tried, 1)  # empty bins report 0
        return {
            "calibration_error": self.calibration_error(),
            "tried": self.tried.tolist(),
            "mean_predicted": (self.predicted / tried).tolist(),
            "observed": (self.accepted / tried).tolist(),
        }


def log_policy_inputs(drafter: DASDrafter, log: OutcomeLog) -> None:
    """Make ``drafter`` report each verified draft's policy input and outcome to ``log``.

    The drafter records a draft's prediction before the map; with the map on, the policy's
    input is taken as that prediction through the map as it stands when the draft's batch is
    verified, before the batch's outcomes enter it (one engine step after the proposal).
    """
    reliability = drafter.reliability
    record_rows = reliability.record_rows
    drafter.record_reliability = True  # the map's inputs are logged with it off too
    mapped = drafter.config.reliability_calibration

    def record_with_log(
        predicted: np.ndarray, num_tokens: np.ndarray, num_accepted: np.ndarray
    ) -> None:
        for row, draft in enumerate(predicted):
            draft = draft[: num_tokens[row]]
            shown = reliability.apply(draft[None, :])[0] if mapped else draft
            log.add(shown, int(num_accepted[row]))
        record_rows(predicted, num_tokens, num_accepted)

    reliability.record_rows = record_with_log  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a replayable trace")
    parser.add_argument(
        "--cost", action="append", help="cost model name or spec, repeatable (default: h100, cpu)"
    )
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="write the reliability curves here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = script_args.trace_steps(parser, args.trace, min_steps=2)
    report: dict[str, object] = {
        "command": f"python scripts/bench_reliability.py --trace {args.trace.name}",
        "num_speculative_tokens": args.k,
        "cost_models": {},
    }
    logs: dict[str, OutcomeLog] = {}
    for name in args.cost or ["h100", "cpu"]:
        cost = script_args.cost_model(parser, name)
        plan = policy_cost_model(cost)
        none = [replay_step(s, steps[s], None, cost).modelled_s for s in sorted(steps)]
        rows: dict[str, object] = {"none_s": none}
        for variant, enabled in VARIANTS.items():
            drafter = build_drafter("das_cost_model", plan, args.k, reliability_calibration=enabled)
            log = logs.setdefault(f"{variant}@{name}", OutcomeLog())
            log_policy_inputs(drafter, log)
            times = [replay_step(s, steps[s], drafter, cost).modelled_s for s in sorted(steps)]
            ratios = [t / n for t, n in zip(times, none, strict=True)]
            rows[variant] = {
                "modelled_s": times,
                "step_time_vs_none": ratios,
                "steps_2_on_vs_none": sum(times[1:]) / sum(none[1:]),
                "policy_inputs": log.to_dict(),
            }
            logger.info(
                "%s %-12s steps 2.. %.3fx none; per step %s; calibration error %.4f",
                name,
                variant,
                rows[variant]["steps_2_on_vs_none"],
                " ".join(f"{r:.3f}" for r in ratios[1:]),
                log.calibration_error(),
            )
        b, a = rows["factors+map"]["modelled_s"], rows["factors"]["modelled_s"]
        rows["map_vs_factors_steps_2_on"] = sum(b[1:]) / sum(a[1:])
        logger.info("%s map / factors, steps 2..: %.3fx", name, rows["map_vs_factors_steps_2_on"])
        report["cost_models"][name] = rows
    write_json_atomically(report, args.json)
    logger.info("wrote %s", args.json)
    if args.plot:
        plot_reliability(logs, args.trace.name, args.plot)
        logger.info("wrote %s", args.plot)


def plot_reliability(logs: dict[str, OutcomeLog], title: str, path: Path) -> None:
    """Observed acceptance against the policy's input, per variant and cost model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, label="perfectly calibrated")
    for label, log in logs.items():
        seen = log.tried > 0
        ax.plot(
            log.predicted[seen] / log.tried[seen],
            log.accepted[seen] / log.tried[seen],
            marker="o",
            markersize=3,
            label=label,
        )
    ax.set_xlabel("predicted cumulative acceptance (the policy's input)")
    ax.set_ylabel("observed: draft prefix accepted")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
