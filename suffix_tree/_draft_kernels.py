"""numba kernels that draft from the suffix forest (the storing side is ``_kernels``, whose
layout and invariants these rely on).

Their part of the forest's record (``ForestState``):

* ``draft_tokens`` / ``draft_probs``: where :func:`speculate_one` writes its drafts, one after
  the other from ``meta[M_DRAFT_CURSOR]`` on (a region is never written again once returned, so
  the caller hands out views of it).
* ``scratch_tokens`` / ``scratch_probs`` (``max_depth + 1`` rows, as many columns as the largest
  budget asked for): row m, the draft from the match of length m; ``walks`` / ``walk_scores``:
  the other per-length state of those walks (columns ``W_*`` / ``S_*``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from suffix_tree._kernels import (
    F_BEST_CHILD,
    F_COUNT,
    F_FIRST_CHILD,
    F_REF_POS,
    F_REF_SEQ,
    F_TOKEN,
    M_DRAFT_CURSOR,
    STALE,
    _is_chain_head,
    _rescan_best_child,
    find_child,
    is_live_slot,
)

# Columns of ``walks`` (int64[max_depth + 1, NUM_WALK_FIELDS], row m: the walk of match length
# m) and ``walk_scores`` (float64[max_depth + 1, NUM_SCORE_FIELDS]), the work space of
# _match_lengths / _draft_all. W_ACTIVE is a list (row a: the a-th active walk), not per length.
W_MATCH_NODE = 0
W_MATCH_IMPLICIT = 1
W_NODE = 2
W_IMPLICIT = 3
W_BUDGET = 4
W_NUM = 5
W_ACTIVE = 6
NUM_WALK_FIELDS = 7
S_CUMULATIVE = 0
S_SCORE = 1
NUM_SCORE_FIELDS = 2
# The match length from which _match_lengths walks all longer lengths together (a context
# unseen before rarely matches so many tokens; one seen before matches up to max_depth).
LOCKSTEP_FROM = 7


@njit(cache=True)
def match_context(state, root, context, lo, hi):
    """Walk ``context[lo:hi]`` from ``root``. Returns (node, implicit_depth), node -1 if absent.

    ``implicit_depth`` > 0 means the position lies that many tokens below chain head ``node``.
    The caller keeps ``hi - lo <= max_depth``.
    """
    nodes = state.nodes
    seq_len = state.seq_len
    node = root
    implicit = 0
    for i in range(lo, hi):
        t = context[i]
        if implicit == 0:
            # The edge table first: a chain head has no children, so a found child settles the
            # step without reading the node's row (one cache miss less per step).
            child = find_child(state, node, t)
            if child >= 0:
                node = child
                continue
            if not _is_chain_head(nodes, node, root):
                return np.int64(-1), np.int64(0)
        ref_seq = nodes[node, F_REF_SEQ]
        pos = nodes[node, F_REF_POS] + implicit
        if ref_seq < 0 or pos >= seq_len[ref_seq]:
            return np.int64(-1), np.int64(0)
        if state.pool[state.seq_start[ref_seq] + pos] != t:
            return np.int64(-1), np.int64(0)
        implicit += 1
    return np.int64(node), np.int64(implicit)


@njit(cache=True)
def _match_lengths(state, root, context, high):
    """Match every suffix of ``context`` of length 1..``high`` that occurs; returns the longest
    such length ``low``, the match of each length m <= low left in row m of ``state.walks``
    (``W_MATCH_NODE``, ``W_MATCH_IMPLICIT``: what :func:`match_context` returns for it).

    Occurrence is monotone in m (a suffix that occurs has all its suffixes occurring), so
    lengths go up from 1 until one fails: a context unseen before stops after a few short walks.
    From length ``LOCKSTEP_FROM`` on (text seen before, long matches), the remaining lengths
    are walked together, one token of each per round: a walk alone is a chain of dependent
    loads, one cache miss after the other, while walks of different lengths are independent,
    so interleaving them lets the processor overlap their misses. A walk that fails ends every
    longer one (it contains the absent text).
    """
    walks = state.walks
    length = context.shape[0]
    for m in range(1, min(high, LOCKSTEP_FROM - 1) + 1):
        node, implicit = match_context(state, root, context, length - m, length)
        if node < 0:
            return m - 1
        walks[m, W_MATCH_NODE] = node
        walks[m, W_MATCH_IMPLICIT] = implicit
    if high < LOCKSTEP_FROM:
        return high
    nodes = state.nodes
    seq_len = state.seq_len
    for m in range(LOCKSTEP_FROM, high + 1):
        walks[m, W_MATCH_NODE] = root
        walks[m, W_MATCH_IMPLICIT] = 0
    alive = high  # the walks of lengths up to alive have not failed
    for k in range(high):
        for m in range(max(k + 1, LOCKSTEP_FROM), alive + 1):  # walks with a k-th token
            node = walks[m, W_MATCH_NODE]
            implicit = walks[m, W_MATCH_IMPLICIT]
            t = context[length - m + k]
            if implicit == 0:
                child = find_child(state, node, t)  # as in match_context: the edge table first
                if child >= 0:
                    walks[m, W_MATCH_NODE] = child
                    continue
                if not _is_chain_head(nodes, node, root):
                    alive = m - 1
                    break
            ref_seq = nodes[node, F_REF_SEQ]
            pos = nodes[node, F_REF_POS] + implicit
            if (
                ref_seq < 0
                or pos >= seq_len[ref_seq]
                or state.pool[state.seq_start[ref_seq] + pos] != t
            ):
                alive = m - 1
                break
            walks[m, W_MATCH_IMPLICIT] = implicit + 1
    return alive


@njit(cache=True)
def _match_lengths_along(state, root, slot, context, high):
    """:func:`_match_lengths` read off a stored sequence instead of walked from the root, or -1
    where the sequence cannot stand for the context.

    Sequence ``slot`` stands for ``context`` if it lies in the tree at ``root`` and ends with
    the context's last ``high`` tokens (a request's own sequence in its own tree; its live
    sequence in its prompt's tree once it holds ``high`` tokens). Then every suffix of length
    m <= high occurs, and the append kernel keeps, per suffix start among the sequence's last
    ``max_depth`` positions, the deepest node of its path materialized when it last looked
    (``active_node`` / ``active_depth``). Appends of other sequences may have materialized
    deeper ones since; descending to them gives what :func:`match_context` returns: the
    deepest materialized node of the path and the implicit tokens below it (a chain head: by
    invariant 3, a node with a child has every continuation materialized). O(high) amortized
    where walking every length from the root takes O(high ** 2). Reads only.
    """
    if slot < 0 or state.seq_root[slot] != root:
        return -1
    length = state.seq_len[slot]
    if length < high:
        return -1
    pool = state.pool
    start = state.seq_start[slot]
    last = context.shape[0] - 1
    for i in range(high):
        if pool[start + length - 1 - i] != context[last - i]:
            return -1
    nodes = state.nodes
    walks = state.walks
    max_depth = state.max_depth
    for m in range(1, high + 1):
        begin = length - m  # the suffix's start, one of the last max_depth positions
        node = state.active_node[slot, begin % max_depth]
        depth = np.int64(state.active_depth[slot, begin % max_depth])
        # The append kernel's descent, written out here as there: as a shared helper the
        # drafter's time measured 15% longer.
        while depth < m and nodes[node, F_FIRST_CHILD] >= 0:
            child = find_child(state, node, pool[start + begin + depth])
            if child < 0:
                break
            node = child
            depth += 1
        walks[m, W_MATCH_NODE] = node
        walks[m, W_MATCH_IMPLICIT] = m - depth
    return high


@njit(cache=True)
def _draft_all(state, root, low, max_tokens, min_token_prob, max_spec_factor):
    """The greedy draft from the match of every length m in 1..``low`` (found by
    :func:`_match_lengths`), written to row m of ``scratch_tokens`` / ``scratch_probs``, its
    length and score to ``walks[m, W_NUM]`` / ``walk_scores[m, S_SCORE]``.

    From the match, each walk follows the most frequent child (invariant 4) or the implicit
    chain, and stops at ``min(max_tokens, m * max_spec_factor)`` tokens, at depth
    ``max_depth``, or before the token that takes the cumulative probability below
    ``min_token_prob``. The walks advance together, one token each per round, as in
    :func:`_match_lengths`.
    """
    nodes = state.nodes
    seq_len = state.seq_len
    walks = state.walks
    scores = state.walk_scores
    out_tokens = state.scratch_tokens
    out_probs = state.scratch_probs
    max_depth = state.max_depth
    num_active = 0
    for m in range(low, 0, -1):
        budget = min(max_tokens, np.int64(m * max_spec_factor + 1e-6))
        walks[m, W_NODE] = walks[m, W_MATCH_NODE]
        walks[m, W_IMPLICIT] = walks[m, W_MATCH_IMPLICIT]
        walks[m, W_BUDGET] = budget
        walks[m, W_NUM] = 0
        scores[m, S_CUMULATIVE] = 1.0
        scores[m, S_SCORE] = 0.0
        if budget > 0 and m < max_depth:
            walks[num_active, W_ACTIVE] = m
            num_active += 1
    while num_active > 0:
        kept = 0
        for a in range(num_active):
            m = walks[a, W_ACTIVE]
            node = walks[m, W_NODE]
            implicit = walks[m, W_IMPLICIT]
            if implicit > 0 or _is_chain_head(nodes, node, root):
                ref_seq = nodes[node, F_REF_SEQ]
                pos = nodes[node, F_REF_POS] + implicit
                if ref_seq < 0 or pos >= seq_len[ref_seq]:
                    continue
                token = state.pool[state.seq_start[ref_seq] + pos]
                prob = 1.0
                walks[m, W_IMPLICIT] = implicit + 1
            else:
                child = nodes[node, F_BEST_CHILD]
                if child == STALE:
                    _rescan_best_child(nodes, node)
                    child = nodes[node, F_BEST_CHILD]
                if child < 0:
                    continue
                token = nodes[child, F_TOKEN]
                prob = nodes[child, F_COUNT] / nodes[node, F_COUNT]
                walks[m, W_NODE] = child
            cumulative = scores[m, S_CUMULATIVE] * prob
            if cumulative < min_token_prob:
                continue
            num = walks[m, W_NUM]
            out_tokens[m, num] = token
            out_probs[m, num] = prob
            scores[m, S_CUMULATIVE] = cumulative
            scores[m, S_SCORE] += cumulative
            num += 1
            walks[m, W_NUM] = num
            if num < walks[m, W_BUDGET] and m + num < max_depth:
                walks[kept, W_ACTIVE] = m  # kept <= a: never overwrites an entry still to read
                kept += 1
        num_active = kept


@njit(cache=True)
def _speculate(
    state,
    root,
    context,
    match_slot,
    max_tokens,
    min_token_prob,
    max_spec_factor,
    out_tokens,
    out_probs,
):
    """Best draft over every suffix match length of ``context`` (``len(context) <= max_depth``).

    For each match length m (1 <= m <= max_depth, the last m tokens occurring in the tree),
    walk the most frequent continuation (at most ``min(max_tokens, m * max_spec_factor)``
    tokens, stopping when the cumulative probability falls below ``min_token_prob`` or at depth
    ``max_depth``). The draft with the highest score (sum of cumulative probabilities) wins;
    ties go to the longer match. Returns (num_tokens, match_len, score); the draft is written to
    ``out_tokens`` / ``out_probs`` (per-token conditional probabilities). Precondition: the
    state's scratch buffers hold ``max_tokens`` per row.

    Every length that occurs is matched (read off sequence ``match_slot`` where it stands for
    the context, :func:`_match_lengths_along`; else walked, :func:`_match_lengths`) and drafted
    (:func:`_draft_all`), the walks of all lengths interleaved.
    """
    high = min(context.shape[0], state.max_depth)
    low = _match_lengths_along(state, root, match_slot, context, high)
    if low < 0:
        low = _match_lengths(state, root, context, high)
    if low == 0:
        return 0, 0, 0.0
    _draft_all(state, root, low, max_tokens, min_token_prob, max_spec_factor)
    scores = state.walk_scores
    best = low
    for match_len in range(low - 1, 0, -1):
        if scores[match_len, S_SCORE] > scores[best, S_SCORE]:  # ties: the longer match
            best = match_len
    num = state.walks[best, W_NUM]
    for i in range(num):  # a loop: slice assignment first checks the arrays for overlap
        out_tokens[i] = state.scratch_tokens[best, i]
        out_probs[i] = state.scratch_probs[best, i]
    return num, best, scores[best, S_SCORE]


@njit(cache=True)
def speculate_one(state, root, context, max_tokens, min_token_prob, max_spec_factor):
    """:func:`_speculate` on the last ``max_depth`` tokens of ``context``; returns
    (begin, end, match_len, score), the draft being ``draft_tokens[begin:end]`` /
    ``draft_probs[begin:end]`` of the state. The draft cursor then moves to ``end``: the region
    is never written again, so the caller may hand out views of it.

    The per-call entry point: one boxed argument for the tree, four numbers back. It refuses
    (begin -1, nothing written) a negative token in ``context``, ``max_tokens`` outside
    ``1..scratch_tokens.shape[1]``, ``min_token_prob`` outside [0, 1], ``max_spec_factor <= 0``
    (NaN included) and a budget that does not fit after the cursor: the caller validates, makes
    room and calls again.
    """
    for i in range(context.shape[0]):
        if context[i] < 0:
            return -1, -1, 0, 0.0
    cursor = state.meta[M_DRAFT_CURSOR]
    if (
        not 0 < max_tokens <= state.scratch_tokens.shape[1]
        or cursor + max_tokens > state.draft_tokens.shape[0]
        or not 0.0 <= min_token_prob <= 1.0
        or not max_spec_factor > 0.0
    ):
        return -1, -1, 0, 0.0
    begin = max(0, context.shape[0] - state.max_depth)
    num, match_len, score = _speculate(
        state,
        root,
        context[begin:],
        np.int64(-1),
        max_tokens,
        min_token_prob,
        max_spec_factor,
        state.draft_tokens[cursor:],
        state.draft_probs[cursor:],
    )
    state.meta[M_DRAFT_CURSOR] = cursor + num
    return cursor, cursor + num, match_len, score


# Status of check_lookup_rows.
LOOKUP_OK = 0
LOOKUP_BAD_MATCH_SLOT = 1
LOOKUP_NEGATIVE_BUDGET = 2
LOOKUP_BAD_CONTEXT_SLOT = 3
LOOKUP_BAD_ROOT = 4


@njit(cache=True)
def check_lookup_rows(seq_alive, num_nodes, roots, context_slots, match_slots, max_tokens):
    """What :func:`speculate_rows` needs of its rows (all of one length), checked in one pass
    each: returns (LOOKUP_OK, the largest budget), or the first failure found and 0: a match
    slot out of range (-1 allowed), a negative budget, a context slot that is not a live
    sequence, a root beyond the node table (a negative root is allowed: an empty draft)."""
    rows = roots.shape[0]
    num_slots = seq_alive.shape[0]
    for i in range(rows):
        if match_slots[i] < -1 or match_slots[i] >= num_slots:
            return LOOKUP_BAD_MATCH_SLOT, 0
    width = 0
    for i in range(rows):
        if max_tokens[i] < 0:
            return LOOKUP_NEGATIVE_BUDGET, 0
        width = max(width, max_tokens[i])
    for i in range(rows):
        if not is_live_slot(seq_alive, context_slots[i]):
            return LOOKUP_BAD_CONTEXT_SLOT, 0
    for i in range(rows):
        if roots[i] >= num_nodes:
            return LOOKUP_BAD_ROOT, 0
    return LOOKUP_OK, width


@njit(cache=True, nogil=True)
def speculate_rows(
    state,
    roots,
    context_slots,
    match_slots,
    max_tokens,
    min_token_prob,
    max_spec_factor,
    out_tokens,
    out_probs,
    out_num,
    out_score,
    out_match,
):
    """Row i: :func:`_speculate` in the tree at ``roots[i]`` with the context taken from the last
    ``max_depth`` tokens of sequence slot ``context_slots[i]``, its matches read off sequence
    ``match_slots[i]`` where that sequence stands for the context (-1: walked). A negative root
    or a budget of 0 gives an empty draft. Precondition: the scratch buffers hold
    ``max(max_tokens)``.

    Runs without the GIL, so that threads can look up disjoint rows at once, each with a record
    of its own scratch buffers (``scratch_*``, ``walks``, ``walk_scores``): it writes only those,
    its output rows and a node's stale best child (``_rescan_best_child``), which every thread
    that rescans the node sets to the same value from the same counts."""
    seq_start = state.seq_start
    for i in range(roots.shape[0]):
        out_num[i] = 0
        out_score[i] = 0.0
        out_match[i] = 0
        root = roots[i]
        if root < 0 or max_tokens[i] <= 0:
            continue
        slot = context_slots[i]
        end = seq_start[slot] + state.seq_len[slot]
        begin = max(seq_start[slot], end - state.max_depth)
        if end == begin:
            continue
        num, match_len, score = _speculate(
            state,
            root,
            state.pool[begin:end],
            match_slots[i],
            max_tokens[i],
            min_token_prob,
            max_spec_factor,
            out_tokens[i],
            out_probs[i],
        )
        out_num[i] = num
        out_score[i] = score
        out_match[i] = match_len
