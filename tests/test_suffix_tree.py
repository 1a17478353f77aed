"""The numba suffix tree against the brute-force oracle in tests/naive.py.

Runs with and without JIT (`make test-nojit` sets NUMBA_DISABLE_JIT=1).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suffix_tree import SuffixForest, SuffixTree
from tests.naive import NaiveSuffixForest

SMALL_VOCAB = st.integers(min_value=0, max_value=3)  # few tokens: many repeats, many ties


def assert_same_draft(ours, expected) -> None:
    tokens, probs, score, match_len = expected
    assert ours.tokens.tolist() == tokens
    np.testing.assert_allclose(ours.probs, probs, rtol=0, atol=1e-12)
    assert ours.score == pytest.approx(score, abs=1e-9)
    assert ours.match_len == match_len


# Operations: ("append", seq, tokens) | ("remove", seq) | ("query", context, budget, min_prob)
operation = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 4), st.lists(SMALL_VOCAB, min_size=1, max_size=9)),
    st.tuples(st.just("remove"), st.integers(0, 4)),
    st.tuples(
        st.just("query"),
        st.lists(SMALL_VOCAB, min_size=0, max_size=8),
        st.integers(1, 8),
        st.sampled_from([0.0, 0.1, 0.4]),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_depth=st.integers(1, 7), operations=st.lists(operation, min_size=1, max_size=30))
def test_tree_matches_oracle_under_appends_removals_and_queries(max_depth, operations):
    tree = SuffixForest(max_depth=max_depth, initial_nodes=16)
    oracle = NaiveSuffixForest(max_depth)
    for op in operations:
        if op[0] == "append":
            _, seq, tokens = op
            tree.append(seq, tokens)
            oracle.append(seq, tokens)
        elif op[0] == "remove":
            seq = op[1]
            if seq in oracle.sequences:
                tree.remove(seq)
                oracle.remove(seq)
        else:
            _, context, budget, min_prob = op
            expected = oracle.speculate(context, budget, min_token_prob=min_prob)
            assert_same_draft(tree.speculate(context, budget, min_token_prob=min_prob), expected)
        tree.check_integrity()


# max_spec_factor caps a draft at match_len * factor tokens: None (no cap), a cap below one
# token for short matches (0.5), and caps that bind at some match lengths only.
SPEC_FACTORS = st.sampled_from([None, 0.5, 1.0, 1.5, 2.0, 3.0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_depth=st.integers(1, 7),
    sequences=st.lists(st.lists(SMALL_VOCAB, min_size=1, max_size=14), min_size=1, max_size=4),
    queries=st.lists(
        st.tuples(
            st.lists(SMALL_VOCAB, min_size=1, max_size=9),
            st.integers(1, 8),
            st.sampled_from([0.0, 0.1, 0.4]),
            SPEC_FACTORS,
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_max_spec_factor_matches_oracle(max_depth, sequences, queries):
    tree = SuffixForest(max_depth=max_depth, initial_nodes=16)
    oracle = NaiveSuffixForest(max_depth)
    for seq_id, tokens in enumerate(sequences):
        tree.append(seq_id, tokens)
        oracle.append(seq_id, tokens)
    tree.check_integrity()
    for context, budget, min_prob, factor in queries:
        expected = oracle.speculate(
            context, budget, min_token_prob=min_prob, max_spec_factor=factor
        )
        got = tree.speculate(context, budget, min_token_prob=min_prob, max_spec_factor=factor)
        assert_same_draft(got, expected)
        # The batch API drafts from a stored sequence's tail: same cap, same answer.
        slot = tree.sequence_handle(0)
        batch = tree.speculate_many(
            np.array([tree.tree_handle(0)]),
            np.array([slot]),
            np.array([budget]),
            min_token_prob=min_prob,
            max_spec_factor=factor,
        )
        expected = oracle.speculate(
            sequences[0], budget, min_token_prob=min_prob, max_spec_factor=factor
        )
        assert_same_draft(batch.row(0), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_depth=st.integers(8, 14),
    sequences=st.lists(st.lists(SMALL_VOCAB, min_size=1, max_size=40), min_size=1, max_size=4),
    cuts=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 16)), min_size=1, max_size=6),
    noise=st.lists(SMALL_VOCAB | st.just(7), min_size=1, max_size=16),
    max_tokens=st.integers(1, 16),
    factor=SPEC_FACTORS,
)
def test_deep_trees_match_oracle_on_long_contexts(
    max_depth, sequences, cuts, noise, max_tokens, factor
):
    # Contexts cut from stored text match up to max_depth tokens (every match length is walked,
    # those from 7 on side by side); changed or random ones, sometimes ending in the never stored
    # token 7, match a few tokens or none.
    tree = SuffixForest(max_depth=max_depth, initial_nodes=16)
    oracle = NaiveSuffixForest(max_depth)
    for seq_id, tokens in enumerate(sequences):
        tree.append(seq_id, tokens)
        oracle.append(seq_id, tokens)
    tree.check_integrity()
    contexts = []
    for pick, size in cuts:
        tokens = sequences[pick % len(sequences)]
        end = pick % len(tokens) + 1
        cut = tokens[max(0, end - size) : end]
        # The same text with one token changed 7 to 10 tokens before the end: the matches of 7
        # and more tokens (walked side by side) fail partway, often on the implicit chain
        # below a node that occurs once.
        changed = list(cut)
        at = max(0, len(cut) - 7 - pick % 4)
        changed[at] = (changed[at] + 1) % 4
        contexts += [cut, changed]
    for context in [*contexts, noise, [*contexts[0], *noise]]:
        for budget, min_prob in ((1, 0.0), (max_tokens, 0.0), (max_tokens, 0.3)):
            expected = oracle.speculate(
                context, budget, min_token_prob=min_prob, max_spec_factor=factor
            )
            got = tree.speculate(context, budget, min_token_prob=min_prob, max_spec_factor=factor)
            assert_same_draft(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    sequences=st.lists(st.lists(SMALL_VOCAB, min_size=1, max_size=12), min_size=1, max_size=4),
    chunk=st.integers(1, 5),
)
def test_appending_in_chunks_equals_appending_at_once(sequences, chunk):
    whole = SuffixForest(max_depth=5)
    pieces = SuffixForest(max_depth=5)
    # Interleave the sequences chunk by chunk, as an engine extends live requests.
    for seq_id, tokens in enumerate(sequences):
        whole.append(seq_id, tokens)
    longest = max(len(s) for s in sequences)
    for begin in range(0, longest, chunk):
        for seq_id, tokens in enumerate(sequences):
            if begin < len(tokens):
                pieces.append(seq_id, tokens[begin : begin + chunk])
    pieces.check_integrity()
    for tokens in sequences:
        for cut in range(1, len(tokens) + 1):
            a = whole.speculate(tokens[:cut], 6, min_token_prob=0.0)
            b = pieces.speculate(tokens[:cut], 6, min_token_prob=0.0)
            assert a.tokens.tolist() == b.tokens.tolist()
            assert a.score == pytest.approx(b.score)


def test_hand_written_sequence_drafts_the_most_frequent_continuation():
    tree = SuffixTree(max_depth=8)
    # "1 2" is followed by 3 twice and by 4 once: after context [.., 1, 2] the draft is 3 with
    # probability 2/3; after 3 comes 9 both times, so the draft goes on with probability 1.
    tree.extend("a", [1, 2, 3, 9, 1, 2, 4, 1, 2, 3, 9])
    draft = tree.speculate([7, 1, 2], max_tokens=2, min_token_prob=0.0)
    assert draft.tokens.tolist() == [3, 9]
    np.testing.assert_allclose(draft.probs, [2 / 3, 1.0])
    assert draft.score == pytest.approx(2 / 3 + 2 / 3)
    assert draft.match_len == 2
    tree.check_integrity()


def test_ties_go_to_the_smaller_token_and_the_longer_match():
    tree = SuffixTree(max_depth=8)
    # After 5 come 8 and 6 once each: the tie goes to token 6.
    tree.extend(0, [5, 8])
    tree.extend(1, [5, 6])
    draft = tree.speculate([5], max_tokens=1, min_token_prob=0.0)
    assert draft.tokens.tolist() == [6]
    # Context [0, 5]: only the match of length 1 exists ([0, 5] does not occur).
    assert tree.speculate([0, 5], max_tokens=1, min_token_prob=0.0).match_len == 1
    # Equal scores from match lengths 1 and 2: the longer match wins.
    tree.extend(2, [4, 5, 6])
    draft = tree.speculate([4, 5], max_tokens=1, min_token_prob=0.0)
    assert draft.match_len == 2 and draft.tokens.tolist() == [6]


def test_a_long_match_fails_inside_a_once_seen_text_while_a_shorter_one_holds():
    tree = SuffixTree(max_depth=12)
    tree.extend("once", [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11])
    tree.extend("other", [1, 2, 3, 4, 5, 6, 7, 5])
    # [9] occurs once, so the text after it is an implicit chain: the 9-token suffix follows it
    # for 7 tokens and then differs (5, not 8), while the 8-token suffix is all of "other". The
    # longest match is 8 tokens, with nothing after it; the best draft comes from [5], followed
    # by 6 in 2 of its 3 occurrences, then 7 always. Continuing the chain instead would draft
    # [10, 11] from a 9-token match.
    draft = tree.speculate([9, 1, 2, 3, 4, 5, 6, 7, 5], max_tokens=2, min_token_prob=0.0)
    assert draft.tokens.tolist() == [6, 7]
    assert draft.match_len == 1
    assert draft.score == pytest.approx(2 / 3 + 2 / 3)


def test_min_token_prob_stops_the_draft():
    tree = SuffixTree(max_depth=8)
    for i in range(4):
        tree.extend(i, [1, 10 + i])  # after 1: four continuations, each with probability 1/4
    assert len(tree.speculate([1], max_tokens=4, min_token_prob=0.3)) == 0
    assert len(tree.speculate([1], max_tokens=4, min_token_prob=0.2)) == 1


def test_depth_bound_limits_matches_and_drafts():
    tree = SuffixTree(max_depth=3)
    tree.extend(0, list(range(10)))
    draft = tree.speculate([0, 1], max_tokens=8, min_token_prob=0.0)
    # A match of length 2 leaves room for one token at depth 3; length 1 leaves two tokens.
    assert draft.tokens.tolist() == [2, 3]
    assert draft.match_len == 1


def test_removal_restores_the_empty_tree():
    tree = SuffixForest(max_depth=6)
    rng = np.random.default_rng(0)
    for i in range(20):
        tree.append(i, rng.integers(0, 5, size=30))
    for i in range(20):
        tree.remove(i)
        tree.check_integrity()
    report = tree.memory()
    assert report.num_live_nodes == 1  # the root
    assert report.num_stored_tokens == 0
    assert len(tree.speculate([1, 2], 4)) == 0


def test_forest_keeps_trees_apart():
    forest = SuffixForest(max_depth=6)
    forest.append("x", [1, 2, 3], tree="prompt-a")
    forest.append("y", [1, 2, 4], tree="prompt-b")
    assert forest.speculate([1, 2], 1, tree="prompt-a").tokens.tolist() == [3]
    assert forest.speculate([1, 2], 1, tree="prompt-b").tokens.tolist() == [4]
    assert len(forest.speculate([1, 2], 1, tree="unknown")) == 0
    forest.drop_tree("prompt-a")
    assert not forest.has_tree("prompt-a") and forest.has_tree("prompt-b")
    forest.check_integrity()


def test_growth_and_pool_compaction_keep_contents():
    forest = SuffixForest(max_depth=4, initial_nodes=16)
    rng = np.random.default_rng(1)
    kept = {}
    for i in range(60):
        tokens = rng.integers(0, 50, size=int(rng.integers(1, 40)))
        forest.append(i, tokens, tree=i % 3)
        kept[i] = tokens
        if i % 4 == 3:  # churn: removals leave holes that compaction reclaims
            forest.remove(i - 2)
            del kept[i - 2]
    forest.check_integrity()
    for i, tokens in kept.items():
        assert forest.sequence_tokens(i).tolist() == tokens.tolist()
