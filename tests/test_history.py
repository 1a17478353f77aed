"""The history store: appearance windows, token budgets, and pruning of emptied prompts."""

from __future__ import annotations

import numpy as np
import pytest

from das.config import DASConfig
from das.drafter import DASDrafter
from rollouts.history import GLOBAL_TREE, HistoryStore, prompt_tree
from suffix_tree import SuffixForest


def tokens(n: int, start: int = 10) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


def store(**overrides) -> HistoryStore:
    settings = {"use_global_tree": False, "window_appearances": 2, **overrides}
    return HistoryStore(SuffixForest(max_depth=8), **settings)


def test_appearance_window_keeps_the_last_appearances_however_far_apart() -> None:
    history = store(window_appearances=2, window_steps=1)
    # Prompt "a" appears at steps 0, 7, 30 and 31 (two samples each); "b" fills the steps between.
    for step in range(40):
        history.begin_step(step)
        if step in (0, 7, 30, 31):
            history.add_rollout("a", step, tokens(5, start=step))
            history.add_rollout("a", step, tokens(6, start=step))
        else:
            history.add_rollout("b", step, tokens(3))
        if step == 29:
            # Far past window_steps=1, both earlier appearances are still there.
            assert history.appearances("a") == [0, 7]
    history.begin_step(40)
    assert history.appearances("a") == [30, 31]
    assert len(history.rollout_ids("a")) == 4
    assert history.mean_length("a") == 5.5
    history.forest.check_integrity()


def test_steps_rule_keeps_only_the_last_window_steps() -> None:
    history = store(window_rule="steps", window_steps=3)
    history.begin_step(0)
    history.add_rollout("a", 0, tokens(5))
    for step in range(1, 5):
        history.begin_step(step)
        history.add_rollout("b", step, tokens(4))
    assert history.appearances("a") == []  # step 0 left the 3-step window at step 4
    assert history.appearances("b") == [1, 2, 3, 4]


def test_token_budget_evicts_the_least_recently_seen_prompt_first() -> None:
    history = store(max_tokens=100, window_appearances=10)
    history.begin_step(0)
    for key in ("a", "b", "c"):
        history.add_rollout(key, 0, tokens(30))
    history.begin_step(1)
    history.add_rollout("a", 1, tokens(5))  # "a" is now seen more recently than "b" and "c"
    assert history.num_prompt_tokens == 95
    history.add_rollout("d", 1, tokens(30))  # 125 tokens: "b" (least recently seen) goes
    assert history.prompt_keys() == ["c", "a", "d"]
    assert history.num_prompt_tokens == 95
    history.add_rollout("d", 1, tokens(60))  # 155: "c" then "a" go
    assert history.prompt_keys() == ["d"]
    assert history.num_prompt_tokens == 90


def test_the_store_never_exceeds_its_token_budgets_after_an_add() -> None:
    rng = np.random.default_rng(0)
    history = store(
        max_tokens=500,
        max_prompt_tokens=120,
        window_appearances=3,
        use_global_tree=True,
        max_global_tokens=200,
    )
    for step in range(30):
        history.begin_step(step)
        for _ in range(8):
            key = f"p{rng.integers(12)}"
            history.add_rollout(key, step, tokens(int(rng.integers(1, 150)), start=step))
            stats = history.stats()
            assert stats.num_prompt_tokens <= 500
            assert stats.num_global_tokens <= 200
            assert all(
                sum(history.forest.sequence_length(s) for s in history.rollout_ids(k)) <= 120
                for k in history.prompt_keys()
            )
    history.forest.check_integrity()


def test_a_prompt_cap_evicts_the_prompts_oldest_rollouts() -> None:
    history = store(max_prompt_tokens=25, window_appearances=10)
    history.begin_step(0)
    history.add_rollout("a", 0, tokens(10, start=1))
    history.begin_step(1)
    history.add_rollout("a", 1, tokens(10, start=2))
    history.add_rollout("a", 1, tokens(10, start=3))
    kept = [history.forest.sequence_tokens(s)[0] for s in history.rollout_ids("a")]
    assert kept == [2, 3] and history.appearances("a") == [1]


def test_an_emptied_prompt_loses_its_tree_and_its_length_stats() -> None:
    history = store(max_tokens=40, window_appearances=1)
    history.begin_step(0)
    history.add_rollout("old", 0, tokens(30))
    assert history.forest.has_tree(prompt_tree("old"))
    history.add_rollout("new", 0, tokens(30))  # over budget: "old" goes whole
    assert not history.forest.has_tree(prompt_tree("old"))
    assert "old" not in history.mean_lengths()
    assert np.isnan(history.mean_length("old"))
    assert history.forest.num_trees == 1
    assert history.stats().num_prompts == 1


def test_many_distinct_prompts_keep_the_forest_bounded() -> None:
    history = store(max_tokens=200, use_global_tree=True, window_steps=2, max_global_tokens=100)
    for step in range(200):  # a new prompt every step, as in one long epoch
        history.begin_step(step)
        history.add_rollout(f"prompt-{step}", step, tokens(20, start=step))
    assert history.forest.num_trees <= 200 // 20 + 1  # prompt trees within budget + global
    assert len(history.mean_lengths()) <= 10
    assert history.forest.has_tree(GLOBAL_TREE)


def test_a_running_request_keeps_its_prompt_tree_until_it_ends() -> None:
    config = DASConfig(
        use_global_tree=False,
        use_own_context=False,
        calibrate=False,
        policy="fixed",
        window_appearances=1,
        max_history_tokens=40,
    )
    drafter = DASDrafter(config)
    drafter.begin_step(0)
    drafter.start_request("first", [1, 2, 3], prompt_key="a")
    drafter.extend_request("first", tokens(10))
    drafter.finish_request("first", "stop")
    drafter.begin_step(1)
    drafter.start_request("r", [1, 2, 3], prompt_key="a")
    drafter.extend_request("r", tokens(4))
    # Other prompts' rollouts push "a"'s history out of the budget while "r" still runs.
    drafter.history.add_rollout("b", 1, tokens(30, start=100))
    drafter.history.add_rollout("c", 1, tokens(30, start=200))
    assert drafter.history.prompt_keys() == ["c"]
    assert drafter.forest.has_tree(prompt_tree("a"))  # "r" still grows in it
    drafter.extend_request("r", tokens(2, start=14))
    drafter.abort_request("r")
    assert not drafter.forest.has_tree(prompt_tree("a"))
    drafter.forest.check_integrity()


@pytest.mark.parametrize(
    ("name", "value"),
    [("window_appearances", 0), ("max_prompt_tokens", -1), ("max_global_tokens", 0)],
)
def test_bad_store_settings_name_the_value(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{name}={value}"):
        store(**{name: value})


def test_bad_window_rule_is_named() -> None:
    with pytest.raises(ValueError, match="window_rule='epochs'"):
        DASConfig(window_rule="epochs")


def test_without_prompt_trees_only_lengths_are_kept() -> None:
    history = store(use_prompt_trees=False, use_global_tree=True)
    history.begin_step(0)
    history.add_rollout("a", 0, tokens(8))
    assert not history.forest.has_tree(prompt_tree("a"))
    assert history.mean_length("a") == 8
    assert history.stats().num_tokens == 8  # the global copy only
