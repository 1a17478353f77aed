"""Input validation, lifecycle errors, memory reporting and warm-up of the suffix forest."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from suffix_tree import SuffixForest, SuffixTree, _draft_kernels, _kernels, _state
from suffix_tree import forest as forest_module


@pytest.fixture
def forest() -> SuffixForest:
    forest = SuffixForest(max_depth=8)
    forest.append("s", [1, 2, 3])
    return forest


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, -2], "negative token id -2"),
        ([1, 2**31], "token id 2147483648 beyond int32"),
        ([1, 2.5], "must hold integers, got 2.5"),
        (["a"], "must hold integers, got 'a'"),
        ("abc", "sequence of token ids"),
        (np.array([1.0, 2.0]), "dtype float64"),
        (np.zeros((2, 2), dtype=np.int32), "one-dimensional"),
    ],
)
def test_bad_tokens_raise_value_error_naming_the_value(forest, tokens, message):
    with pytest.raises(ValueError, match=message):
        forest.append("s", tokens)
    # Nothing already stored was lost or corrupted.
    assert forest.sequence_tokens("s").tolist() == [1, 2, 3]
    forest.check_integrity()


def test_bad_queries_and_unknown_sequences(forest):
    with pytest.raises(ValueError, match="max_tokens=0 must be > 0"):
        forest.speculate([1], 0)
    with pytest.raises(ValueError, match="max_tokens=-3"):
        forest.speculate([1], -3)
    with pytest.raises(ValueError, match=r"min_token_prob=1\.5"):
        forest.speculate([1], 2, min_token_prob=1.5)
    with pytest.raises(ValueError, match="seq_id='nope' is not in this forest"):
        forest.remove("nope")
    with pytest.raises(ValueError, match="belongs to tree=0, not tree='other'"):
        forest.append("s", [4], tree="other")
    with pytest.raises(ValueError, match="max_depth=0"):
        SuffixForest(max_depth=0)
    assert len(forest.speculate([], 4)) == 0  # empty context: empty draft, no error


def test_large_token_ids_and_numpy_inputs_round_trip():
    forest = SuffixForest(max_depth=4)
    big = 2**31 - 1
    forest.append(0, np.array([big, 7, big, 7], dtype=np.int64))
    assert forest.speculate(np.array([big], dtype=np.uint32), 2).tokens.tolist() == [7, big]


def test_memory_report_counts_what_is_stored():
    forest = SuffixForest(max_depth=8)
    rng = np.random.default_rng(0)
    for i in range(10):
        forest.append(i, rng.integers(0, 1000, size=100))
    report = forest.memory()
    assert report.num_stored_tokens == 1000
    assert report.total == report.nodes + report.edges + report.tokens + report.sequences
    # Random text: almost every suffix is unique, so chains stay implicit (few nodes per token).
    assert report.num_live_nodes < 3 * 1000


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="tests compilation itself")
def test_kernels_are_compiled_at_construction_and_first_call_is_fast():
    SuffixTree(max_depth=24)
    for kernel in (
        _kernels.append_tokens,
        _kernels.append_rows,
        _kernels.remove_sequence,
        _draft_kernels.speculate_one,
        _draft_kernels.speculate_rows,
        _kernels.rehash,
        _kernels.recount_occurrences,
        _kernels.find_child,
        _kernels.alloc_node,
        _kernels.free_tree,
        _kernels.check_rows,
        _draft_kernels.check_lookup_rows,
        _state.array_addresses,
    ):
        assert kernel.signatures, f"{kernel.__name__} was not compiled by the warm-up"
    tree = SuffixTree(max_depth=24)
    started = time.perf_counter()
    tree.extend(0, list(range(200)))
    tree.speculate(list(range(10, 40)), 16)
    tree.remove(0)
    # Generous bound: a compile would take seconds; compiled calls take microseconds.
    assert time.perf_counter() - started < 0.5


def test_batch_apis_match_one_at_a_time_calls():
    rng = np.random.default_rng(3)
    one, many = SuffixForest(max_depth=6), SuffixForest(max_depth=6)
    prompts = {i: rng.integers(0, 6, size=int(rng.integers(1, 12))) for i in range(8)}
    for i, tokens in prompts.items():
        one.append(i, tokens, tree=i % 3)
        many.append(i, tokens, tree=i % 3)
    for _ in range(5):  # engine-like steps: a few tokens per row, then drafts for every row
        chunks = {i: rng.integers(0, 6, size=int(rng.integers(0, 4))) for i in prompts}
        for i, chunk in chunks.items():
            one.append(i, chunk, tree=i % 3)
        slots = np.array([many.sequence_handle(i) for i in prompts])
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks.values()])])
        many.append_many(slots, np.concatenate(list(chunks.values())), offsets)
        roots = np.array([many.tree_handle(i % 3) for i in prompts])
        budgets = rng.integers(0, 5, size=len(prompts))
        batch = many.speculate_many(roots, slots, budgets, min_token_prob=0.0)
        for row, i in enumerate(prompts):
            context = one.sequence_tokens(i)[-6:]
            expected = (
                one.speculate(context, int(budgets[row]), tree=i % 3, min_token_prob=0.0)
                if budgets[row] > 0
                else None
            )
            got = batch.row(row)
            if expected is None:
                assert len(got) == 0
            else:
                assert got.tokens.tolist() == expected.tokens.tolist()
                assert got.score == pytest.approx(expected.score)
                assert got.match_len == expected.match_len
        many.check_integrity()


def test_batch_apis_reject_bad_handles():
    forest = SuffixForest(max_depth=4)
    forest.append("a", [1, 2])
    slot = forest.sequence_handle("a")
    with pytest.raises(ValueError, match="not a live sequence"):
        forest.append_many(np.array([slot + 1]), np.array([1], np.int32), np.array([0, 1]))
    with pytest.raises(ValueError, match="offsets="):
        forest.append_many(np.array([slot]), np.array([1], np.int32), np.array([0, 2]))
    with pytest.raises(ValueError, match="max_tokens="):
        forest.speculate_many(np.array([0]), np.array([slot]), np.array([-1]))
    assert forest.sequence_tokens("a").tolist() == [1, 2]


@pytest.mark.parametrize(
    ("rows", "offsets", "message"),
    [
        (["a", "b"], [0, 3, 2], "must be non-decreasing"),
        (["a", "a"], [0, 1, 2], "holds a slot twice"),
        ([10**6], [0, 2], "not a live sequence"),
        ([-1], [0, 2], "not a live sequence"),
        (["a"], [[0, 2]], "offsets=.* must run from 0"),
        (["a"], [1, 2], "offsets=.* must run from 0"),
        ([["a"]], [0, 2], "slots=.* must be one-dimensional"),
    ],
)
def test_append_many_names_what_is_wrong_with_its_rows_and_stores_nothing(rows, offsets, message):
    forest = SuffixForest(max_depth=4)
    forest.append("a", [1, 2])
    forest.append("b", [3])
    handles = {"a": forest.sequence_handle("a"), "b": forest.sequence_handle("b")}
    slots = np.array(
        [[handles[r] for r in row] for row in rows]
        if isinstance(rows[0], list)
        else [handles.get(r, r) for r in rows]
    )
    with pytest.raises(ValueError, match=message):
        forest.append_many(slots, np.array([5, 6], np.int32), np.array(offsets))
    assert forest.sequence_tokens("a").tolist() == [1, 2]
    assert forest.sequence_tokens("b").tolist() == [3]
    forest.check_integrity()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"match_slots": [10**6]}, "match_slots=.* holds a slot out of range"),
        ({"match_slots": [-2]}, "match_slots=.* holds a slot out of range"),
        ({"max_tokens": [-1]}, "max_tokens=.* must be >= 0"),
        ({"context_slots": [10**6]}, "context_slots=.* holds a slot that is not live"),
        ({"roots": [10**9]}, "roots=.* holds a node beyond"),
        ({"roots": [[0]]}, "must have one entry per row"),
    ],
)
def test_speculate_many_names_what_is_wrong_with_its_rows(change, message):
    forest = SuffixForest(max_depth=4)
    forest.append("a", [1, 2, 1, 2])
    rows = {
        "roots": [forest.tree_handle(0)],
        "context_slots": [forest.sequence_handle("a")],
        "max_tokens": [3],
        "match_slots": [-1],
    }
    assert forest.speculate_many(**{k: np.array(v) for k, v in rows.items()}).num_tokens[0] > 0
    rows.update(change)
    with pytest.raises(ValueError, match=message):
        forest.speculate_many(**{k: np.array(v) for k, v in rows.items()})


def test_negative_tokens_in_an_int32_context_are_rejected():
    forest = SuffixForest(max_depth=4)
    forest.append(0, [1, 2, 3])
    with pytest.raises(ValueError, match="negative token id -5"):
        forest.speculate(np.array([1, -5], dtype=np.int32), 2)


def test_negative_tokens_in_an_int32_append_are_rejected_and_nothing_is_stored(forest):
    # An int32 array to an existing sequence goes straight to the kernel, which checks it.
    with pytest.raises(ValueError, match="negative token id -7"):
        forest.append("s", np.array([4, 5, -7], dtype=np.int32))
    assert forest.sequence_tokens("s").tolist() == [1, 2, 3]
    forest.check_integrity()
    # A new sequence with a negative token is not created at all.
    with pytest.raises(ValueError, match="negative token id -1"):
        forest.append("new", np.array([-1], dtype=np.int32))
    assert forest.num_sequences == 1


def test_growth_rebuilds_the_kernels_record():
    forest = SuffixForest(max_depth=100, initial_nodes=16)
    rng = np.random.default_rng(2)
    # Past every initial capacity: node pool, edge table, token pool, slots, draft buffers.
    for i in range(40):
        forest.append(i, rng.integers(0, 30, size=50).astype(np.int32), tree=i % 2)
    unique = rng.permutation(1000)[:300] + 100  # tokens 100.. occur once each, in tree 0
    forest.append("long", unique)
    # Every token of `unique` occurs once, so every match continues along that occurrence with
    # probability 1; the 1-token match leaves the most depth (99 tokens, score 99) and wins:
    # more than the initial 64-token draft buffers hold.
    draft = forest.speculate(unique[:10], max_tokens=200, min_token_prob=0.0)
    assert draft.tokens.tolist() == unique[10:109].tolist()
    assert draft.match_len == 1
    forest.check_integrity()  # also checks that the record holds the current arrays
    assert [forest.sequence_length(i) for i in range(40)] == [50] * 40


def test_a_draft_keeps_its_tokens_while_later_drafts_fill_and_replace_the_buffers():
    forest = SuffixForest(max_depth=6)
    # "1 2" is followed by 3 three times and by 7 once: the draft is 3 4 5 6 (3/4, then 1).
    forest.append(0, [1, 2, 3, 4, 5, 6] * 3 + [1, 2, 7])
    first = forest.speculate(np.array([1, 2], np.int32), 4, min_token_prob=0.0)
    assert first.tokens.tolist() == [3, 4, 5, 6]
    # Drafts are views of the forest's draft buffers: 3,000 later drafts of 4 tokens (other
    # tokens, by both the per-call and the checked path) fill more than two buffers' worth.
    contexts = [np.array([5], np.int32), [6]]  # a list takes the checked path
    later = [forest.speculate(contexts[i % 2], 4, min_token_prob=0.0) for i in range(3000)]
    assert first.tokens.tolist() == [3, 4, 5, 6]
    np.testing.assert_allclose(first.probs, [0.75, 1.0, 1.0, 1.0])
    assert later[0].tokens.tolist() == [6, 1, 2, 3]
    assert all(d.tokens.tolist() == [1, 2, 3, 4] for d in later[1::2])


def test_churn_compacts_the_token_pool_and_keeps_contents():
    forest = SuffixForest(max_depth=4, initial_nodes=16)
    rng = np.random.default_rng(4)
    kept = {}
    for i in range(200):
        tokens = rng.integers(0, 50, size=200).astype(np.int32)
        forest.append(i, tokens[:150], tree=i % 2)
        forest.append(i, tokens[150:], tree=i % 2)
        kept[i] = tokens
        if i >= 2:  # at most 3 sequences live at a time
            forest.remove(i - 2)
            del kept[i - 2]
    forest.check_integrity()
    for i, tokens in kept.items():
        assert forest.sequence_tokens(i).tolist() == tokens.tolist()
    # 40,000 tokens went through; without compaction the pool would hold room for all of them.
    assert forest.memory().tokens < 200 * 200 * 4 // 8


def test_lookups_split_among_threads_give_the_drafts_of_one_thread():
    # Rows enough for 4 chunks of MIN_ROWS_PER_THREAD and more; long repeated text, so that
    # every lookup walks many match lengths in its thread's scratch buffers at once.
    rng = np.random.default_rng(11)
    forest = SuffixForest(max_depth=12)
    motifs = rng.integers(0, 50, size=(6, 40))
    for seq in range(64):
        parts = [motifs[m] for m in rng.integers(0, 6, size=8)]
        forest.append(seq, np.concatenate(parts), tree=seq % 4)
    rows = 8 * forest_module.MIN_ROWS_PER_THREAD
    slots = np.array([forest.sequence_handle(int(s)) for s in rng.integers(0, 64, size=rows)])
    roots = np.array([forest.tree_handle(int(t)) for t in rng.integers(0, 4, size=rows)])
    budgets = rng.integers(0, 17, size=rows)
    one = forest.speculate_many(roots, slots, budgets, min_token_prob=0.0)
    assert (one.num_tokens > 4).sum() > rows // 2  # the lookups do real work
    for _ in range(20):
        split = forest.speculate_many(roots, slots, budgets, min_token_prob=0.0, threads=4)
        for name in ("tokens", "probs", "num_tokens", "scores", "match_lens"):
            np.testing.assert_array_equal(getattr(split, name), getattr(one, name), err_msg=name)
    with pytest.raises(ValueError, match="threads=0"):
        forest.speculate_many(roots, slots, budgets, threads=0)


def _split_lookup_matches_one_thread(forest, roots, slots, budgets) -> bool:
    one = forest.speculate_many(roots, slots, budgets, min_token_prob=0.0)
    split = forest.speculate_many(roots, slots, budgets, min_token_prob=0.0, threads=2)
    return bool(np.array_equal(one.tokens, split.tokens))


def test_a_forked_child_gets_lookup_threads_of_its_own():
    import multiprocessing

    forest = SuffixForest(max_depth=8)
    for seq in range(8):
        forest.append(seq, np.arange(seq, seq + 200) % 37, tree=0)
    rows = 4 * forest_module.MIN_ROWS_PER_THREAD
    slots = np.array([forest.sequence_handle(i % 8) for i in range(rows)])
    roots = np.full(rows, forest.tree_handle(0))
    budgets = np.full(rows, 8)
    assert _split_lookup_matches_one_thread(forest, roots, slots, budgets)  # the parent's pool
    child = multiprocessing.get_context("fork").Process(
        target=lambda: os._exit(
            0 if _split_lookup_matches_one_thread(forest, roots, slots, budgets) else 1
        )
    )
    child.start()
    child.join(timeout=60)
    if child.is_alive():  # waiting on the parent's threads, which a forked child lacks
        child.kill()
        pytest.fail("the forked child's split lookup hung")
    assert child.exitcode == 0
