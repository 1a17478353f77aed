"""How well DAS picks among its draft sources: rules for the choice, against the best per pass.

DAS drafts from three suffix trees per request (its prompt's history, the global tree of recent
responses, its own text) and verifies one draft: the source with the largest calibrated expected
accepted length. This replays a trace with a fixed budget of K and, at every pass, records how
many leading tokens of each source's draft the trace accepts. It then scores choice rules by the
tokens their picks would have had accepted, as a share of the best source per pass (an oracle
only a replay has), over the steps from ``--from-step`` on (pass by pass, along DAS's own
trajectory: a rule's picks do not change later passes here).

Rules: DAS's calibrated score; uncalibrated probabilities; the longest suffix match; the longest
draft; the score plus a bonus per token two sources' drafts agree on; always one source; and a
least-squares predictor of each source's accepted length over all these features, fitted on the
first counted step and scored on the rest.

    python scripts/bench_source_choice.py --trace TRACE --json benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from das.atomic_json import write_json_atomically
from das.bench.trace_oracle import OracleSourceDrafter, TraceView, accepted_per_source
from das.config import DASConfig
from das.drafter import SOURCES
from policies.profiles import load_cost_model
from rollouts.replay import replay_step
from rollouts.trace import group_by_step, read_trace
from suffix_tree.draft import DraftBatch

logger = logging.getLogger("bench_source_choice")

AGREEMENT_BONUSES = (0.25, 0.5, 1.0)


class SourceLog(OracleSourceDrafter):
    """Verifies DAS's own choice, and logs per pass what every source's draft would give."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[dict[str, np.ndarray]] = []

    def _choose_sources(self, batches: list[DraftBatch | None], scores: np.ndarray) -> np.ndarray:
        rows = scores.shape[1]
        shape = (len(SOURCES), rows)
        num, match, raw = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        agree = np.zeros(shape)  # tokens of each draft that another source's draft repeats
        for source, batch in enumerate(batches):
            if batch is None:
                continue
            num[source], match[source] = batch.num_tokens, batch.match_lens
            raw[source] = batch.cumulative_probs().sum(axis=1)
            for other, twin in enumerate(batches):
                if other != source and twin is not None:
                    # The other draft as the truth: how far this draft repeats it.
                    repeated = [twin.tokens[row, :n] for row, n in enumerate(twin.num_tokens)]
                    agree[source] += accepted_per_source([batch], repeated)[0]
        self.passes.append(
            {
                "step": np.full(rows, self.step),
                "accepted": accepted_per_source(batches, self.truths),
                "score": scores.copy(),
                "raw": raw,
                "match": match,
                "num": num,
                "agree": agree,
            }
        )
        return np.argmax(scores, axis=0)


def accepted_of_picks(accepted: np.ndarray, values: np.ndarray) -> int:
    """Accepted tokens of the source each row's largest ``values`` picks (``accepted``:
    [sources, rows], -1 for a disabled source, which never wins; ties: the first maximum)."""
    pick = np.argmax(np.where(accepted >= 0, values, -np.inf), axis=0)
    return int(accepted[pick, np.arange(accepted.shape[1])].sum())


def features(log: dict[str, np.ndarray]) -> np.ndarray:
    """[sources, rows, features] for the least-squares rule."""
    return np.stack(
        [
            np.ones_like(log["score"]),
            log["score"],
            log["score"] ** 2,
            log["raw"],
            np.log1p(log["match"]),
            log["num"],
            log["agree"],
        ],
        axis=-1,
    )


def score_rules(log: dict[str, np.ndarray], from_step: int) -> dict[str, Any]:
    """Accepted tokens of each rule's picks, and their share of the best source per pass."""
    counted = log["step"] >= from_step
    accepted = log["accepted"][:, counted]

    def total(values: np.ndarray) -> int:
        return accepted_of_picks(accepted, values)

    def col(name: str) -> np.ndarray:
        return log[name][:, counted]

    score = col("score")
    rules = {
        "calibrated score (DAS)": total(score),
        "uncalibrated probabilities": total(col("raw")),
        "longest suffix match": total(col("match") + 1e-3 * score),
        "longest draft": total(col("num") + 1e-3 * score),
    }
    for bonus in AGREEMENT_BONUSES:
        rules[f"score + {bonus} x agreeing tokens"] = total(score + bonus * col("agree"))
    for index, name in enumerate(SOURCES):
        rules[f"always {name}"] = int(accepted[index].sum())
    best = int(accepted.max(axis=0).sum())
    report: dict[str, Any] = {
        "rows": int(accepted.shape[1]),
        "best_source_per_pass": best,
        "rules": {name: {"accepted": n, "share_of_best": n / best} for name, n in rules.items()},
    }
    steps = np.unique(log["step"][counted])
    if steps.size >= 2:
        fit_rows = log["step"] == steps[0]
        test_rows = log["step"] > steps[0]
        x_all = features(log)
        predicted = np.full(log["score"].shape, -np.inf)
        for source in range(len(SOURCES)):
            usable = fit_rows & (log["accepted"][source] >= 0)
            if not usable.any():
                continue
            weights, *_ = np.linalg.lstsq(
                x_all[source, usable], log["accepted"][source, usable], rcond=None
            )
            predicted[source] = x_all[source] @ weights
        test = log["accepted"][:, test_rows]
        learned = accepted_of_picks(test, predicted[:, test_rows])
        current = accepted_of_picks(test, log["score"][:, test_rows])
        report["least_squares"] = {
            "fitted_on_step": int(steps[0]),
            "accepted": learned,
            "calibrated_score_accepted": current,
            "ratio_to_calibrated_score": learned / current,
        }
    return report


def log_sources(trace: Path, k: int) -> tuple[dict[str, np.ndarray], int]:
    """Replay ``trace`` with DAS at a fixed budget of ``k``, logging every pass; returns the
    concatenated log and the accepted tokens the replay itself counted (steps 2..)."""
    steps = group_by_step(read_trace(trace))
    drafter = SourceLog(DASConfig(num_speculative_tokens=k, policy="fixed"))
    view = TraceView(drafter)
    cost = load_cost_model("h100")  # prices passes only; the picks do not depend on it
    accepted_by_replay = 0
    for step in tqdm(sorted(steps), desc="replay"):
        view.set_step(steps[step])
        result = replay_step(step, steps[step], view, cost)
        if step >= min(steps) + 1:
            accepted_by_replay += result.accepted_tokens
    log = {
        key: np.concatenate([entry[key] for entry in drafter.passes], axis=-1)
        for key in drafter.passes[0]
    }
    return log, accepted_by_replay


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout trace")
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.trace.is_file():
        parser.error(f"--trace {args.trace} does not exist")
    log, accepted_by_replay = log_sources(args.trace, args.k)
    first = int(log["step"].min())
    report = {
        "command": f"python scripts/bench_source_choice.py --trace {args.trace.name} --k {args.k}",
        "trace": args.trace.name,
        "num_speculative_tokens": args.k,
        "from_step": first + 1,
        "accepted_by_replay": accepted_by_replay,
        **score_rules(log, first + 1),
    }
    logger.info("best source per pass: %d accepted draft tokens", report["best_source_per_pass"])
    for name, row in report["rules"].items():
        logger.info("%-34s %9d  %.3f of best", name, row["accepted"], row["share_of_best"])
    if "least_squares" in report:
        logger.info(
            "least squares (fitted on step %d): %.4fx the calibrated score's tokens on later steps",
            report["least_squares"]["fitted_on_step"] + 1,
            report["least_squares"]["ratio_to_calibrated_score"],
        )
    if args.json:
        write_json_atomically(report, args.json)
        logger.info("wrote %s", args.json)
    return report


if __name__ == "__main__":
    main()
