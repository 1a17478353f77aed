"""The reliability A/B benchmark on the small recorded trace in tests/data."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_map_brings_the_policy_inputs_closer_to_what_is_accepted(tmp_path, load_script) -> None:
    bench = load_script("bench_reliability")
    out, plot = tmp_path / "reliability.json", tmp_path / "reliability.png"
    trace = ROOT / "tests" / "data" / "trace_small.parquet"
    bench.main(["--trace", str(trace), "--cost", "h100", "--json", str(out), "--plot", str(plot)])
    rows = json.loads(out.read_text())["cost_models"]["h100"]
    assert plot.stat().st_size > 0
    factors, mapped = rows["factors"], rows["factors+map"]
    for variant in (factors, mapped):
        inputs = variant["policy_inputs"]
        assert sum(inputs["tried"]) > 1000
        assert all(0.0 <= value <= 1.0 for value in inputs["observed"])
    # The (source, match-length) factors alone are off by about 0.05 on this trace.
    assert (
        mapped["policy_inputs"]["calibration_error"]
        < 0.6 * factors["policy_inputs"]["calibration_error"]
    )
