"""Lookups split among threads: the same replay, and the number of threads ``auto`` picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from das import config as das_config
from das import methods
from das.config import DASConfig
from policies.profiles import load_cost_model, policy_cost_model
from rollouts.replay import replay_trace
from rollouts.trace import group_by_step, read_trace
from suffix_tree import SuffixForest

TRACE = Path(__file__).resolve().parents[1] / "tests" / "data" / "trace_small.parquet"


def test_a_replay_with_lookup_threads_matches_one_thread(monkeypatch) -> None:
    cost = load_cost_model("h100")
    steps = group_by_step(read_trace(TRACE))
    splits = []
    speculate_many = SuffixForest.speculate_many

    def counting(self, *args, **kwargs):
        rows, threads = len(args[0]), kwargs.get("threads", 1)
        splits.append(min(threads, rows // 32))
        return speculate_many(self, *args, **kwargs)

    monkeypatch.setattr(SuffixForest, "speculate_many", counting)
    outcomes = {}
    for threads in (1, 4):
        drafter = methods.build_drafter(
            "das_cost_model", policy_cost_model(cost), lookup_threads=threads
        )
        results = replay_trace(steps, drafter, cost)
        outcomes[threads] = (
            [(r.modelled_s, r.forward_passes, r.accepted_tokens) for r in results],
            [r.shapes.draft_tokens.tolist() for r in results],
            dict(drafter.stats.wins_by_source),
        )
    assert max(splits) >= 2  # some batches really were split
    assert outcomes[4] == outcomes[1]


@pytest.mark.parametrize(("cores", "threads"), [(2, 1), (7, 1), (8, 2), (16, 4), (128, 4)])
def test_auto_lookup_threads_take_a_quarter_of_the_cores_up_to_four(
    monkeypatch, cores, threads
) -> None:
    monkeypatch.setattr(das_config.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert DASConfig().num_lookup_threads == threads
    assert DASConfig(lookup_threads=3).num_lookup_threads == 3


@pytest.mark.parametrize("bad", [0, -2, "many", True, 1.5])
def test_a_bad_lookup_threads_is_named(bad) -> None:
    with pytest.raises(ValueError, match="lookup_threads"):
        DASConfig(lookup_threads=bad)
