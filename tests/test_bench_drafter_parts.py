"""The drafter-parts benchmark on the small recorded trace in tests/data."""

from __future__ import annotations

from pathlib import Path

from das import methods
from policies.profiles import load_cost_model, policy_cost_model
from rollouts.replay import replay_step
from rollouts.trace import group_by_step, read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "tests" / "data" / "trace_small.parquet"


def test_parts_are_timed_inside_their_calls_once_per_pass(tmp_path, load_script) -> None:
    bench = load_script("bench_drafter_parts")
    report = bench.main(["--trace", str(TRACE), "--json", str(tmp_path / "p.json")])
    assert (tmp_path / "p.json").stat().st_size > 0
    cost = load_cost_model("h100")
    steps = group_by_step(read_trace(TRACE))
    keys = sorted(steps)
    for method, row in report["methods"].items():
        # The same drafter replayed untimed: the timed step made as many passes (one propose
        # each), so the timers neither changed what it drafted nor missed a call.
        drafter = methods.build_drafter(method, policy_cost_model(cost))
        for key in keys[:2]:
            alone = replay_step(key, steps[key], drafter, cost)
        assert row["passes"] == alone.shapes.num_requests.size - 1  # the prefill-only pass
        seconds = row["seconds"]
        inside_propose = sum(
            seconds.get(label, 0.0) for label in ("tree lookups", "policy bound", "policy budgets")
        )
        assert 0 < inside_propose < seconds["propose"]
        assert 0 < seconds["tree appends"] < seconds["extend_many"]
    # Only the cost-model policy has a budget policy to time; the global tree has none.
    assert report["methods"]["das_cost_model"]["seconds"]["policy budgets"] > 0
    assert "policy budgets" not in report["methods"]["suffix_global"]["seconds"]
