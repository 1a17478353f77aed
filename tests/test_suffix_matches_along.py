"""Matches read off a stored sequence (``match_slots``) give the drafts of walking the tree.

A lookup whose context ends a sequence stored in the same tree (a request's own sequence in
its own tree, its live sequence in its prompt's tree) reads every suffix's match off that
sequence's append state instead of walking each from the root. These tests compare the two on
repetitive text where other sequences keep materializing nodes below the stored ones, and
hand the kernel sequences that do not end with the context, which it must walk instead.
"""

from __future__ import annotations

import numpy as np

from suffix_tree import SuffixForest

FIELDS = ("tokens", "probs", "num_tokens", "scores", "match_lens")


def _assert_same_batches(read, walked) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(read, name), getattr(walked, name), err_msg=name)


def _grow_forest(rng: np.random.Generator, max_depth: int) -> tuple[SuffixForest, list[int]]:
    """Sequences of shared motifs in three trees, appended a few tokens at a time in turns."""
    forest = SuffixForest(max_depth=max_depth)
    motifs = rng.integers(0, 12, size=(5, 7))
    for seq in range(12):
        forest.append(seq, [], tree=seq % 3)
    for _ in range(30):
        seq = int(rng.integers(0, 12))
        chunk = motifs[rng.integers(0, 5)][: int(rng.integers(1, 8))]
        forest.append(seq, chunk, tree=seq % 3)
    return forest, list(range(12))


def test_matches_read_off_each_sequence_give_the_walked_drafts():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        max_depth = int(rng.integers(3, 25))
        forest, seqs = _grow_forest(rng, max_depth)
        # Each sequence's context in its own tree: it ends the sequence, so matches are read.
        live = [s for s in seqs if forest.sequence_length(s) > 0]
        slots = np.array([forest.sequence_handle(s) for s in live])
        roots = np.array([forest.tree_handle(s % 3) for s in live])
        budgets = np.full(len(live), 16)
        read = forest.speculate_many(roots, slots, budgets, min_token_prob=0.0)
        walked = forest.speculate_many(
            roots, slots, budgets, min_token_prob=0.0, match_slots=np.full(len(live), -1)
        )
        _assert_same_batches(read, walked)
        checked += int((read.num_tokens > 0).sum())
        forest.check_integrity()
    assert checked > 200  # most lookups draft something: the comparison is not vacuous


def test_a_sequence_that_does_not_end_with_the_context_is_walked_instead():
    rng = np.random.default_rng(1)
    for _ in range(40):
        forest, seqs = _grow_forest(rng, int(rng.integers(3, 25)))
        live = [s for s in seqs if forest.sequence_length(s) > 0]
        contexts = rng.choice(live, size=24)
        # A random sequence of any tree stands for each context: mostly not one that ends with
        # it, sometimes shorter than the context, sometimes in another tree.
        others = rng.choice(live, size=24)
        slots = np.array([forest.sequence_handle(int(s)) for s in contexts])
        roots = np.array([forest.tree_handle(int(s) % 3) for s in contexts])
        match_slots = np.array([forest.sequence_handle(int(s)) for s in others])
        budgets = np.full(24, 16)
        given = forest.speculate_many(
            roots, slots, budgets, min_token_prob=0.0, match_slots=match_slots
        )
        walked = forest.speculate_many(
            roots, slots, budgets, min_token_prob=0.0, match_slots=np.full(24, -1)
        )
        _assert_same_batches(given, walked)


def test_a_request_whose_live_sequence_is_shorter_than_its_context_is_walked():
    # The context [1, 2, 3, 5, 6] ends with the prompt's last token: only "5 6" is in the live
    # sequence, and the best draft continues the longer match "3 5 6", found by walking.
    forest = SuffixForest(max_depth=8)
    forest.append("h1", [3, 5, 6, 7, 8, 9, 10, 11], tree="prompt")
    forest.append("h2", [5, 6, 1, 2, 4, 4, 4], tree="prompt")
    forest.append("h3", [5, 6, 1, 2, 4, 4, 4], tree="prompt")
    forest.append("own", [1, 2, 3, 5, 6], tree="own")  # prompt [1, 2, 3], response 5, 6
    forest.append("live", [5, 6], tree="prompt")  # the same response, in the prompt's tree
    roots = np.array([forest.tree_handle("prompt")])
    slots = np.array([forest.sequence_handle("own")])
    live = np.array([forest.sequence_handle("live")])
    given = forest.speculate_many(roots, slots, np.array([8]), min_token_prob=0.0, match_slots=live)
    assert given.row(0).tokens.tolist() == [7, 8, 9, 10, 11]
    assert given.match_lens.tolist() == [3]
