"""How far a tree knows a given continuation of a context, against the brute-force oracle
(tests/naive.py). Runs with and without JIT."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suffix_tree import SuffixForest
from tests.naive import NaiveSuffixForest
from tests.test_suffix_tree import SMALL_VOCAB, SPEC_FACTORS

DEPTH = 6
NUM_TREES = 2
# (tree, tokens) per sequence; sequence i has id i.
SEQUENCES = st.lists(
    st.tuples(st.integers(0, NUM_TREES - 1), st.lists(SMALL_VOCAB, min_size=1, max_size=14)),
    min_size=1,
    max_size=5,
)


# Forests, the truth and the tree bounds that the tree-draft property tests draw.
TREE_CASES = {
    "sequences": SEQUENCES,
    "truth": st.lists(SMALL_VOCAB, max_size=8),
    "max_nodes": st.integers(1, 12),
    "max_path": st.integers(1, 6),
    "factor": SPEC_FACTORS,
}


def _forests(
    sequences: list[tuple[int, list[int]]],
) -> tuple[SuffixForest, dict[int, NaiveSuffixForest]]:
    """A forest holding ``sequences`` (sequence i has id i) and a brute-force oracle per tree."""
    forest = SuffixForest(max_depth=DEPTH, initial_nodes=16)
    naive = {tree: NaiveSuffixForest(DEPTH) for tree in range(NUM_TREES)}
    for seq, (tree, tokens) in enumerate(sequences):
        forest.append(seq, tokens, tree=tree)
        naive[tree].append(seq, tokens)
    return forest, naive


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sequences=SEQUENCES,
    removed=st.integers(0, 8),
    continuation=st.lists(SMALL_VOCAB, max_size=10),
    budget=st.integers(0, 9),
    factor=SPEC_FACTORS,
    read_along=st.booleans(),
)
def test_known_continuations_match_a_brute_force_search(
    sequences, removed, continuation, budget, factor, read_along
) -> None:
    forest, naive = _forests(sequences)
    if removed < len(sequences) - 1:  # a removal leaves stale best children and freed chains
        tree = sequences[removed][0]
        forest.remove(removed)
        naive[tree].remove(removed)
    live = [seq for seq in range(len(sequences)) if seq != removed]
    # Every live sequence's context against every tree: its own (read along the sequence when
    # asked) and the other ones (walked from the root).
    rows = [(seq, tree) for seq in live for tree in range(NUM_TREES)]
    width = max(1, len(continuation))
    truths = np.zeros((len(rows), width), np.int32)
    truths[:, : len(continuation)] = continuation
    lengths, matches = forest.known_continuations(
        np.array([forest.tree_handle(tree) for _, tree in rows]),
        np.array([forest.sequence_handle(seq) for seq, _ in rows]),
        truths,
        np.full(len(rows), len(continuation)),
        np.full(len(rows), budget),
        max_spec_factor=factor,
        match_slots=np.array(
            [
                forest.sequence_handle(seq) if read_along and sequences[seq][0] == tree else -1
                for seq, tree in rows
            ]
        ),
    )
    for (seq, tree), length, match in zip(rows, lengths.tolist(), matches.tolist(), strict=True):
        context = naive[sequences[seq][0]].sequences[seq]
        expected = naive[tree].known_continuation(
            context, continuation, budget, max_spec_factor=factor
        )
        assert (length, match) == expected, (seq, tree, context)


def test_a_continuation_through_a_less_frequent_child_is_known_beyond_the_greedy_draft() -> None:
    forest = SuffixForest(max_depth=8)
    for seq in range(3):
        forest.append(seq, [1, 2, 3, 4, 5])  # the most frequent continuation of 1 2: 3 4 5
    forest.append(3, [1, 2, 7, 8, 9])
    forest.append("request", [6, 1, 2])
    slot = np.array([forest.sequence_handle("request")])
    root = np.array([forest.tree_handle(0)])
    greedy = forest.speculate_many(root, slot, np.array([4]), min_token_prob=0.0)
    assert greedy.tokens[0, : greedy.num_tokens[0]].tolist() == [3, 4, 5]
    lengths, matches = forest.known_continuations(
        root, slot, np.array([[7, 8, 9, 1]]), np.array([4]), np.array([4])
    )
    assert (lengths.tolist(), matches.tolist()) == ([3], [2])
    # The factor bounds it as it bounds a draft: at most twice the match of 2 tokens...
    lengths, _ = forest.known_continuations(
        root, slot, np.array([[7, 8, 9, 1]]), np.array([4]), np.array([4]), max_spec_factor=1.0
    )
    assert lengths.tolist() == [2]
    # ...and a continuation of which the tree holds nothing gives 0.
    lengths, matches = forest.known_continuations(
        root, slot, np.array([[9, 9]]), np.array([2]), np.array([4])
    )
    assert (lengths.tolist(), matches.tolist()) == ([0], [0])


def test_a_known_continuation_ends_at_the_trees_depth() -> None:
    forest = SuffixForest(max_depth=4)
    forest.append("a", [1, 2, 3, 4, 5, 6, 7, 8])  # one occurrence: an implicit chain below 1 2
    forest.append("request", [1, 2])
    lengths, matches = forest.known_continuations(
        np.array([forest.tree_handle(0)]),
        np.array([forest.sequence_handle("request")]),
        np.array([[3, 4, 5, 6]]),
        np.array([4]),
        np.array([4]),
    )
    # After the match 1 2, depth 4 leaves room for 3 4; after the match 2, for 3 4 5.
    assert (lengths.tolist(), matches.tolist()) == ([3], [1])


def test_known_continuations_name_bad_rows() -> None:
    forest = SuffixForest(max_depth=4)
    forest.append("a", [1, 2, 3])
    root = np.array([forest.tree_handle(0)])
    slot = np.array([forest.sequence_handle("a")])
    with pytest.raises(ValueError, match="continuation_lens"):
        forest.known_continuations(root, slot, np.zeros((1, 2)), np.array([3]), np.array([2]))
    with pytest.raises(ValueError, match="rows"):
        forest.known_continuations(root, slot, np.zeros((2, 2)), np.array([1]), np.array([2]))
    with pytest.raises(ValueError, match="max_tokens"):
        forest.known_continuations(root, slot, np.zeros((1, 2)), np.array([1]), np.array([-1]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**TREE_CASES)
def test_tree_drafts_hold_the_most_probable_positions_below_the_best_match(
    sequences, truth, max_nodes, max_path, factor
) -> None:
    forest, naive = _forests(sequences)
    rows = [(seq, tree) for seq in range(len(sequences)) for tree in range(NUM_TREES)]
    width = max(1, len(truth))
    truths = np.zeros((len(rows), width), np.int32)
    truths[:, : len(truth)] = truth
    cumulative, accepted, num, matches = forest.tree_drafts(
        np.array([forest.tree_handle(tree) for _, tree in rows]),
        np.array([forest.sequence_handle(seq) for seq, _ in rows]),
        truths,
        np.full(len(rows), len(truth)),
        max_nodes,
        max_path,
        max_spec_factor=factor,
    )
    for i, (seq, tree) in enumerate(rows):
        positions, match = naive[tree].tree_draft(
            sequences[seq][1], max_nodes, max_path, max_spec_factor=factor
        )
        values = [p for p, _ in positions]
        assert (num[i], matches[i]) == (min(max_nodes, len(positions)), match), (seq, tree)
        assert cumulative[i, : num[i]].tolist() == values[: num[i]]
        assert not cumulative[i, num[i] :].any()
        # Where the j-th node is strictly more probable than the next position, the first j + 1
        # nodes are every position at least that probable: how far the truth runs through
        # them is settled whatever order ties took.
        for j in range(num[i]):
            if j + 1 < len(values) and values[j] == values[j + 1]:
                continue
            held = {tuple(path) for p, path in positions if p >= values[j]}
            depth = 0
            while depth < len(truth) and tuple(truth[: depth + 1]) in held:
                depth += 1
            assert accepted[i, j] == depth, (seq, tree, j)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**TREE_CASES)
def test_merged_trees_sum_at_least_the_best_single_tree_and_stay_under_the_ceiling(
    sequences, truth, max_nodes, max_path, factor
) -> None:
    forest, _ = _forests(sequences)
    rows = [(seq, tree) for seq in range(len(sequences)) for tree in range(NUM_TREES)]
    args = (
        np.array([forest.tree_handle(tree) for _, tree in rows]),
        np.array([forest.sequence_handle(seq) for seq, _ in rows]),
        np.tile(np.array(truth or [0], np.int32), (len(rows), 1)),
        np.full(len(rows), len(truth)),
    )
    single, _, _, _ = forest.tree_drafts(*args, max_nodes, max_path, max_spec_factor=factor)
    merged, held, num, matches = forest.tree_drafts(
        *args, max_nodes, max_path, max_spec_factor=factor, merge_matches=True
    )
    ceiling, _ = forest.known_continuations(
        *args, np.full(len(rows), max_path), max_spec_factor=factor
    )
    assert not matches.any()
    for i in range(len(rows)):
        values = merged[i, : num[i]]
        assert (np.diff(values) <= 0).all() and not merged[i, num[i] :].any()
        assert values.sum() >= single[i].sum() - 1e-9
        assert (num[i] == 0) == (single[i, 0] == 0)
        if num[i]:
            assert held[i, num[i] - 1] <= ceiling[i]
            assert (np.diff(held[i, : num[i]]) >= 0).all()


def test_a_merged_tree_holds_a_shorter_matchs_branch_the_best_single_tree_lacks() -> None:
    forest = SuffixForest(max_depth=8)
    forest.append("a", [5, 1, 2, 3, 3, 3, 3, 3])  # after 5 1 2: always 3 3 3 ...
    for copy in range(2):
        forest.append(("b", copy), [1, 2, 7, 7, 7, 7])  # after 1 2: mostly 7 7 7 ...
    forest.append("request", [5, 1, 2], tree="own")
    args = (
        np.array([forest.tree_handle(0)]),
        np.array([forest.sequence_handle("request")]),
        np.array([[7, 7, 7]], np.int32),
        np.array([3]),
    )
    # Below 5 1 2 four nodes of probability 1 (the path cap: max_path 4) sum highest.
    _, held, num, matches = forest.tree_drafts(*args, 6, 4)
    assert (num.tolist(), matches.tolist(), held[0, 3]) == ([4], [3], 0)
    merged, held, num, _ = forest.tree_drafts(*args, 6, 4, merge_matches=True)
    # Those four, then 7 and 7 7 (2/3 each below 1 2): the target's 7 7 is in the tree.
    assert num.tolist() == [6]
    assert merged[0].tolist() == [1.0, 1.0, 1.0, 1.0, 2 / 3, 2 / 3]
    assert held[0].tolist() == [0, 0, 0, 0, 1, 2]


def test_a_shorter_match_with_a_smaller_better_tree_leaves_no_nodes_of_the_longer_one() -> None:
    forest = SuffixForest(max_depth=8)
    for i in range(4):  # below 1 2 3: four rare branches of three tokens (12 positions)
        forest.append(("branch", i), [1, 2, 3, 10 + i, 20 + i, 30 + i])
    for i in range(20):  # 1 2 3 often ends a sequence: every position below it is rare
        forest.append(("end", i), [1, 2, 3])
    for i in range(40):  # 2 3 mostly goes on with 10 20
        forest.append(("common", i), [2, 3, 10, 20])
    forest.append("request", [9, 1, 2, 3], tree="own")
    cumulative, _, num, matches = forest.tree_drafts(
        np.array([forest.tree_handle(0)]),
        np.array([forest.sequence_handle("request")]),
        np.zeros((1, 1), np.int32),
        np.array([0]),
        10,
        3,
        max_spec_factor=1.0,
    )
    # Below 1 2 3 ten nodes of 1/24 sum 0.42; below 2 3 (paths of at most 2 tokens) eight
    # positions sum 1.375 and win: the row holds those eight and nothing after them.
    assert (num.tolist(), matches.tolist()) == ([8], [2])
    assert cumulative[0, :2].tolist() == [41 / 64, 41 / 64]
    assert not cumulative[0, 8:].any()
