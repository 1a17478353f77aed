"""Several trees in one forest against one brute-force oracle per tree (tests/naive.py).

The trees share the node pool, the edge table and the token pool, so an operation on one tree
that wrote into another's nodes or edges would show up as a wrong draft or a failed integrity
check there. Runs with and without JIT.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suffix_tree import SuffixForest
from tests.naive import NaiveSuffixForest
from tests.test_suffix_tree import SMALL_VOCAB, SPEC_FACTORS, assert_same_draft

NUM_TREES = 3
NUM_SEQS = 4
TOKENS = st.lists(SMALL_VOCAB, min_size=1, max_size=9)
MIN_PROBS = st.sampled_from([0.0, 0.1, 0.4])

# ("append", seq, tree, tokens): a new seq starts in `tree`, a live one stays in its own tree.
# ("append_many", {seq: tokens}): one batch call over live sequences of any trees.
# ("remove", i) | ("drop_tree", i): the i-th (modulo) live sequence / existing tree.
# ("query", tree, context, budget, min_prob, factor): tree NUM_TREES never exists.
# ("query_many", budget, min_prob, factor): one row per live sequence, drafting in its own tree.
operation = st.one_of(
    st.tuples(
        st.just("append"), st.integers(0, NUM_SEQS - 1), st.integers(0, NUM_TREES - 1), TOKENS
    ),
    st.tuples(
        st.just("append_many"),
        st.dictionaries(st.integers(0, NUM_SEQS - 1), st.lists(SMALL_VOCAB, max_size=4)),
    ),
    st.tuples(st.just("remove"), st.integers(0, 63)),
    st.tuples(st.just("drop_tree"), st.integers(0, 63)),
    st.tuples(
        st.just("query"),
        st.integers(0, NUM_TREES),
        st.lists(SMALL_VOCAB, min_size=1, max_size=8),
        st.integers(1, 8),
        MIN_PROBS,
        SPEC_FACTORS,
    ),
    st.tuples(st.just("query_many"), st.integers(0, 8), MIN_PROBS, SPEC_FACTORS),
)


class Oracles:
    """One :class:`NaiveSuffixForest` per tree, each seeing only its own tree's sequences."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.by_tree: dict[int, NaiveSuffixForest] = {}
        self.tree_of: dict[int, int] = {}

    def append(self, seq: int, tokens: list[int], tree: int) -> None:
        self.tree_of.setdefault(seq, tree)
        oracle = self.by_tree.setdefault(tree, NaiveSuffixForest(self.max_depth))
        oracle.append(seq, tokens)

    def remove(self, seq: int) -> None:
        self.by_tree[self.tree_of.pop(seq)].remove(seq)

    def drop_tree(self, tree: int) -> None:
        for seq in [s for s, t in self.tree_of.items() if t == tree]:
            self.remove(seq)
        del self.by_tree[tree]

    def speculate(self, tree: int, context, budget, min_prob, factor):
        oracle = self.by_tree.get(tree, NaiveSuffixForest(self.max_depth))
        return oracle.speculate(context, budget, min_token_prob=min_prob, max_spec_factor=factor)

    def tokens(self, seq: int) -> list[int]:
        return self.by_tree[self.tree_of[seq]].sequences[seq]


def apply(forest: SuffixForest, oracles: Oracles, op: tuple) -> None:
    kind = op[0]
    if kind == "append":
        _, seq, tree, tokens = op
        tree = oracles.tree_of.get(seq, tree)
        forest.append(seq, tokens, tree=tree)
        oracles.append(seq, tokens, tree)
    elif kind == "append_many":
        rows = {seq: tokens for seq, tokens in op[1].items() if seq in oracles.tree_of}
        slots = np.array([forest.sequence_handle(seq) for seq in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in rows.values()])])
        flat = np.array([t for tokens in rows.values() for t in tokens], dtype=np.int32)
        forest.append_many(slots, flat, offsets)
        for seq, tokens in rows.items():
            oracles.append(seq, tokens, oracles.tree_of[seq])
    elif kind == "remove":
        live = sorted(oracles.tree_of)
        if live:
            seq = live[op[1] % len(live)]
            forest.remove(seq)
            oracles.remove(seq)
    elif kind == "drop_tree":
        trees = sorted(oracles.by_tree)
        if trees:
            tree = trees[op[1] % len(trees)]
            assert forest.has_tree(tree)
            forest.drop_tree(tree)
            oracles.drop_tree(tree)
    elif kind == "query":
        _, tree, context, budget, min_prob, factor = op
        got = forest.speculate(
            context, budget, tree=tree, min_token_prob=min_prob, max_spec_factor=factor
        )
        assert_same_draft(got, oracles.speculate(tree, context, budget, min_prob, factor))
    else:
        _, budget, min_prob, factor = op
        seqs = sorted(oracles.tree_of)
        batch = forest.speculate_many(
            np.array([forest.tree_handle(oracles.tree_of[s]) for s in seqs], dtype=np.int64),
            np.array([forest.sequence_handle(s) for s in seqs], dtype=np.int64),
            np.full(len(seqs), budget, dtype=np.int64),
            min_token_prob=min_prob,
            max_spec_factor=factor,
        )
        for row, seq in enumerate(seqs):
            if budget == 0:
                assert len(batch.row(row)) == 0
                continue
            context = oracles.tokens(seq)
            expected = oracles.speculate(oracles.tree_of[seq], context, budget, min_prob, factor)
            assert_same_draft(batch.row(row), expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_depth=st.integers(1, 6),
    operations=st.lists(operation, min_size=1, max_size=30),
    probe=st.lists(SMALL_VOCAB, min_size=1, max_size=6),
)
def test_each_tree_of_a_forest_matches_its_own_oracle(max_depth, operations, probe):
    forest = SuffixForest(max_depth=max_depth, initial_nodes=16)
    oracles = Oracles(max_depth)
    for op in operations:
        apply(forest, oracles, op)
        forest.check_integrity()
        assert forest.num_sequences == len(oracles.tree_of)
        for seq in oracles.tree_of:
            assert forest.sequence_tokens(seq).tolist() == oracles.tokens(seq)
        # Every tree (and one that never exists) answers the probe as its own oracle does.
        for tree in range(NUM_TREES + 1):
            got = forest.speculate(probe, 4, tree=tree, min_token_prob=0.0)
            assert_same_draft(got, oracles.speculate(tree, probe, 4, 0.0, None))
