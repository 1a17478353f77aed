"""Where the target's branch lies in best-first trees, on the small recorded trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from das import methods
from das.bench.trace_oracle import TraceView
from policies.profiles import load_cost_model, policy_cost_model
from rollouts.replay import replay_step
from rollouts.trace import group_by_step, read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "tests" / "data" / "trace_small.parquet"


def test_no_tree_gets_further_than_the_ceiling_and_bigger_trees_get_as_far(load_script) -> None:
    bench = load_script("bench_tree_branch_rank")
    steps = group_by_step(read_trace(TRACE))
    cost = load_cost_model("h100")
    plan = policy_cost_model(cost)
    linear = methods.build_drafter("das_cost_model", plan, 16)
    probe = bench.BranchRankProbe(
        linear.config, policy=linear.policy, cost=plan, probe_nodes=256, first_step=min(steps)
    )
    view = TraceView(probe)
    for step in sorted(steps):
        view.set_step(steps[step])
        replay_step(step, steps[step], view, cost)
    records = np.array(probe.records)
    ceiling, sixteen, needed, _ = records.T
    assert len(records) > 100
    # A tree of any shape from a source gets at most as far as the source's tree holds.
    assert (sixteen <= ceiling).all()
    # Some 16-node trees fall short, and some of those a bigger best-first tree reaches: past
    # the 16th node, and never where 16 nodes already got as far.
    short = ceiling > sixteen
    assert short.any()
    reached = needed[short][needed[short] != bench.UNREACHED]
    assert reached.size and (reached > 16).all()
    assert (needed[~short] <= 16).all()


def test_branch_rank_benchmark_writes_its_summary(tmp_path, load_script) -> None:
    bench = load_script("bench_tree_branch_rank")
    out = tmp_path / "rank.json"
    bench.main(["--trace", str(TRACE), "--max-nodes", "64", "--json", str(out)])
    summary = json.loads(out.read_text())["steps_after_the_first"]
    assert summary["rows"] > 100
    assert 0 < summary["share_16_nodes_short_of_ceiling"] < 1
    assert summary["mean_depth_16_nodes"] < summary["mean_ceiling_depth"]
