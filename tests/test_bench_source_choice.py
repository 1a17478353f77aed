"""The source-choice benchmark on the small recorded trace in tests/data."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_source_choice_counts_what_the_replay_accepts_and_no_rule_beats_the_best_source(
    tmp_path, load_script
) -> None:
    bench = load_script("bench_source_choice")
    out = tmp_path / "choice.json"
    report = bench.main(
        ["--trace", str(ROOT / "tests" / "data" / "trace_small.parquet"), "--json", str(out)]
    )
    assert json.loads(out.read_text()) == report
    rules = report["rules"]
    # The log's counterfactual for DAS's own picks is what the replay itself accepted.
    assert rules["calibrated score (DAS)"]["accepted"] == report["accepted_by_replay"] > 0
    best = report["best_source_per_pass"]
    assert all(0 < row["accepted"] <= best for row in rules.values())
    # The three single sources together cover every pick, so the best per pass is at most
    # their sum, and each of them alone gives less than the best.
    always = [rules[f"always {name}"]["accepted"] for name in ("prompt", "global", "own")]
    assert max(always) < best <= sum(always)
    assert report["least_squares"]["fitted_on_step"] == 1
