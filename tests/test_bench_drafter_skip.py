"""The drafter-skip benchmark on the small recorded trace in tests/data."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_skip_benchmark_replays_identically_and_writes_both_times(tmp_path, load_script) -> None:
    bench = load_script("bench_drafter_skip")
    out = tmp_path / "skip.json"
    bench.main(
        ["--trace", str(ROOT / "tests" / "data" / "trace_small.parquet"), "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert set(report["drafter_s"]) == {"lookup_always", "skip"}
    steps = len(report["steps"])
    assert steps >= 2 and all(len(times) == steps for times in report["drafter_s"].values())
    assert report["lookup_always_over_skip"] > 0
    # The script raises if skipping changed any step; drafts were still made somewhere.
    assert sum(row["draft_tokens"] for row in report["steps"]) > 0
