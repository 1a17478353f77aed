"""Replay oracles: how far a trace accepts each draft, and what a traced replay counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from das import methods
from das.bench.trace_oracle import TraceView, accepted_per_source
from policies.profiles import load_cost_model, policy_cost_model
from rollouts.replay import replay_step
from rollouts.trace import group_by_step, read_trace
from suffix_tree.draft import DraftBatch

ROOT = Path(__file__).resolve().parents[1]


def _batch(tokens: list[list[int]], num: list[int]) -> DraftBatch:
    rows = len(tokens)
    return DraftBatch(
        np.array(tokens, np.int32),
        np.ones((rows, len(tokens[0]))),
        np.array(num, np.int64),
        np.zeros(rows),
        np.zeros(rows, np.int64),
    )


def test_accepted_counts_the_leading_tokens_that_equal_the_rest_of_the_response() -> None:
    truths = [np.array([5, 6, 7, 8]), np.array([9])]
    first = _batch([[5, 6, 0, 8], [9, 9, 9, 9]], num=[4, 4])  # a mismatch; past the end
    second = _batch([[5, 6, 7, 8], [9, 0, 0, 0]], num=[3, 0])  # cut by num_tokens
    accepted = accepted_per_source([first, None, second], truths)
    assert accepted.tolist() == [[2, 1], [-1, -1], [3, 0]]


def test_a_traced_replay_counts_the_rejected_draft_tokens_the_replay_does() -> None:
    steps = group_by_step(read_trace(ROOT / "tests" / "data" / "trace_small.parquet"))
    cost = load_cost_model("h100")
    view = TraceView(methods.build_drafter("das_fixed", policy_cost_model(cost), 16))
    for step in sorted(steps)[:2]:
        view.set_step(steps[step])
        result = replay_step(step, steps[step], view, cost)
        rejected = result.draft_tokens - result.accepted_tokens
        assert rejected > 0
        assert sum(view.rejected.values()) == rejected
        assert sum(view.passes.values()) >= result.forward_passes
