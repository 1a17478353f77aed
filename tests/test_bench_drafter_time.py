"""The drafter-time benchmark on the small recorded trace in tests/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from das import methods
from policies.profiles import load_cost_model, policy_cost_model
from rollouts.replay import replay_trace
from rollouts.trace import group_by_step, read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "tests" / "data" / "trace_small.parquet"


def test_drafter_time_is_counted_once_per_replayed_pass(tmp_path, load_script) -> None:
    bench = load_script("bench_drafter_time")
    report = bench.main(
        [
            "--trace",
            str(TRACE),
            "--json",
            str(tmp_path / "t.json"),
            "--plot",
            str(tmp_path / "t.png"),
        ]
    )
    assert (tmp_path / "t.png").stat().st_size > 0
    cost = load_cost_model("h100")
    steps = group_by_step(read_trace(TRACE))
    # The drafter that timed its own lookups measured every band it drafted in.
    measured = report["auto_lookup_us_per_request"]
    assert measured and all(us > 0 for us in measured.values())
    for method in ("suffix_global", "das_cost_model"):
        # The same drafter replayed on its own: the benchmark's bands hold exactly its passes,
        # each in the band of the requests it decoded.
        drafter = methods.build_drafter(method, policy_cost_model(cost))
        alone = replay_trace(steps, drafter, cost)
        sizes = np.concatenate([result.shapes.num_requests for result in alone[1:]])
        counts = np.bincount(bench.band_of(sizes), minlength=len(report["bands"]))
        row = report["methods"][method]
        expected = {label: int(n) for label, n in zip(report["bands"], counts, strict=True) if n}
        assert {label: band["passes"] for label, band in row["bands"].items()} == expected
        totals = row["steps_2_on"]
        assert totals["drafter_s"] > 0
        assert totals["time_with_drafter_vs_none"] > totals["time_vs_none"]
