"""numba kernels for tree-shaped drafts: several branches below a match, verified in one pass
(the linear drafts are ``_draft_kernels``', whose match state these reuse; the layout and
invariants are ``_kernels``').

A greedy draft follows one path below its match, the most frequent child at each node. A
tree-shaped draft may hold any nodes below the match that form a subtree of it; a pass that
verifies it accepts the longest of its paths that the target produces.

* :func:`known_continuation_rows`: given the tokens the target will produce, the longest prefix
  of them the tree holds after some suffix of the context, within the bounds every draft keeps
  (budget, ``max_spec_factor`` times the match, depth): how far any draft from this tree, of
  any shape, can be accepted.
* :func:`best_first_tree_rows`: the draft tree of the most probable nodes below a match (each
  node's probability: the product of its path's count ratios), and how far the target's
  tokens run through each of its prefixes in that order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from suffix_tree._draft_kernels import (
    W_MATCH_IMPLICIT,
    W_MATCH_NODE,
    _match_lengths,
    _match_lengths_along,
)
from suffix_tree._kernels import (
    F_COUNT,
    F_FIRST_CHILD,
    F_NEXT_SIBLING,
    F_REF_POS,
    F_REF_SEQ,
    F_TOKEN,
    _is_chain_head,
    find_child,
)


@njit(cache=True)
def _descend(state, root, node, implicit, token):
    """One token down from a position of the tree (``node``, ``implicit`` tokens below it on a
    chain head's implicit path), as :func:`~suffix_tree._draft_kernels.match_context` steps.
    Returns the new position, or (-1, 0) where the tree holds no such continuation."""
    if implicit == 0:
        child = find_child(state, node, token)
        if child >= 0:
            return np.int64(child), np.int64(0)
        if not _is_chain_head(state.nodes, node, root):
            return np.int64(-1), np.int64(0)
    ref_seq = state.nodes[node, F_REF_SEQ]
    pos = state.nodes[node, F_REF_POS] + implicit
    if (
        ref_seq < 0
        or pos >= state.seq_len[ref_seq]
        or state.pool[state.seq_start[ref_seq] + pos] != token
    ):
        return np.int64(-1), np.int64(0)
    return np.int64(node), np.int64(implicit + 1)


@njit(cache=True)
def _match_row(state, root, context_slot, match_slot):
    """Match the context of a row (the last ``max_depth`` tokens of sequence ``context_slot``)
    in the tree at ``root`` as :func:`~suffix_tree._draft_kernels.speculate_rows` does: returns
    the longest match length found (0 for an empty context), each match m <= it in row m of
    ``state.walks``."""
    end = state.seq_start[context_slot] + state.seq_len[context_slot]
    begin = max(state.seq_start[context_slot], end - state.max_depth)
    if end == begin:
        return 0
    context = state.pool[begin:end]
    high = min(context.shape[0], state.max_depth)
    low = _match_lengths_along(state, root, match_slot, context, high)
    if low < 0:
        low = _match_lengths(state, root, context, high)
    return low


@njit(cache=True)
def known_continuation_rows(
    state,
    roots,
    context_slots,
    match_slots,
    continuations,
    continuation_lens,
    max_tokens,
    max_spec_factor,
    out_len,
    out_match,
):
    """Row i: the longest prefix of ``continuations[i, :continuation_lens[i]]`` that the tree at
    ``roots[i]`` holds right after some suffix of the context (the last ``max_depth`` tokens of
    sequence ``context_slots[i]``, matches read off ``match_slots[i]`` as
    :func:`~suffix_tree._draft_kernels.speculate_rows` does), to ``out_len[i]``, and the match
    length it follows, to ``out_match[i]`` (ties: the longer match).

    From a match of length m the prefix keeps the bounds of a draft from that match: at most
    ``min(max_tokens[i], m * max_spec_factor)`` tokens, and m plus the prefix at most
    ``max_depth``. A negative root, a budget of 0 or an empty context gives 0. Reads only (and
    the match work space ``walks``)."""
    max_depth = state.max_depth
    for i in range(roots.shape[0]):
        out_len[i] = 0
        out_match[i] = 0
        root = roots[i]
        if root < 0 or max_tokens[i] <= 0:
            continue
        low = _match_row(state, root, context_slots[i], match_slots[i])
        for m in range(low, 0, -1):
            cap = min(
                max_tokens[i],
                np.int64(m * max_spec_factor + 1e-6),
                max_depth - m,
                continuation_lens[i],
            )
            if cap <= out_len[i]:
                continue
            node = state.walks[m, W_MATCH_NODE]
            implicit = state.walks[m, W_MATCH_IMPLICIT]
            held = 0
            while held < cap:
                node, implicit = _descend(state, root, node, implicit, continuations[i, held])
                if node < 0:
                    break
                held += 1
            if held > out_len[i]:
                out_len[i] = held
                out_match[i] = m


# Work space of best_first_tree_rows: candidate nodes pushed while growing one tree. A pass
# that pushes more stops pushing (the tree keeps the nodes found so far).
MAX_CANDIDATES = 8192


@njit(cache=True)
def _heap_push(heap, size, keys, entry):
    """Push entry index ``entry`` onto the max-heap ``heap[:size]`` ordered by ``keys``."""
    i = size
    heap[i] = entry
    while i > 0:
        parent = (i - 1) // 2
        if keys[heap[parent]] >= keys[heap[i]]:
            break
        heap[parent], heap[i] = heap[i], heap[parent]
        i = parent
    return size + 1


@njit(cache=True)
def _heap_pop(heap, size, keys):
    """Pop the entry of the largest key from ``heap[:size]``: returns (entry, new size)."""
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and keys[heap[left + 1]] > keys[heap[left]]:
            child = left + 1
        if keys[heap[i]] >= keys[heap[child]]:
            break
        heap[i], heap[child] = heap[child], heap[i]
        i = child
    return top, size


# A path hash packs two polynomial hashes modulo the prime 2**31 - 1, with distinct
# multipliers, in the high and low 31 bits of an int64: no product passes 2**63, so the
# arithmetic never overflows, compiled or not. The prime is also the mask of the low 31 bits.
_HASH_PRIME = 2147483647
_HASH_BITS = 31


@njit(cache=True, inline="always")
def _extend_hash(path_hash, token):
    """The hash of a path one token longer (the empty path's hash is 0)."""
    high = ((path_hash >> _HASH_BITS) * 48271 + token + 1) % _HASH_PRIME
    low = ((path_hash & _HASH_PRIME) * 69621 + token + 1) % _HASH_PRIME
    return (high << _HASH_BITS) | low


@njit(cache=True, inline="always")
def _push_entry(work, hashes, heap, size, entry, cumulative, node, implicit, depth, on_truth, path):
    """Record candidate ``entry`` (a work column, see :func:`_push_children`) and push it."""
    work[0, entry] = cumulative
    work[1, entry] = node
    work[2, entry] = implicit
    work[3, entry] = depth
    work[4, entry] = 1.0 if on_truth else 0.0
    hashes[entry] = path
    return _heap_push(heap, size, work[0], entry)


@njit(cache=True)
def _push_children(
    state,
    root,
    node,
    implicit,
    cumulative,
    depth,
    on_truth,
    truth,
    truth_len,
    work,
    heap,
    size,
    entries,
    hashes,
    path_hash,
):
    """Push every child position of (``node``, ``implicit``) at path depth ``depth + 1``: the
    next token of a chain head's implicit path (probability 1), or each materialized child
    (its count over the node's). ``on_truth``: the parent's path equals ``truth[:depth]``.
    ``work`` rows: cumulative probability, node, implicit, depth, on-truth flag; ``hashes``: each
    entry's path (its tokens below the match) hashed, from the parent's ``path_hash``.
    Returns (heap size, entries)."""
    nodes = state.nodes
    # The child continues the truth if its parent does and its token is the truth's next one.
    next_truth = truth[depth] if on_truth and depth < truth_len else -1
    if implicit > 0 or _is_chain_head(nodes, node, root):
        ref_seq = nodes[node, F_REF_SEQ]
        pos = nodes[node, F_REF_POS] + implicit
        if ref_seq < 0 or pos >= state.seq_len[ref_seq] or entries >= MAX_CANDIDATES:
            return size, entries
        token = state.pool[state.seq_start[ref_seq] + pos]
        size = _push_entry(
            work,
            hashes,
            heap,
            size,
            entries,
            cumulative,
            node,
            implicit + 1,
            depth + 1,
            token == next_truth,
            _extend_hash(path_hash, token),
        )
        return size, entries + 1
    parent_count = nodes[node, F_COUNT]
    child = nodes[node, F_FIRST_CHILD]
    while child >= 0 and entries < MAX_CANDIDATES:
        token = nodes[child, F_TOKEN]
        size = _push_entry(
            work,
            hashes,
            heap,
            size,
            entries,
            cumulative * (nodes[child, F_COUNT] / parent_count),  # <= cumulative
            child,
            0,
            depth + 1,
            token == next_truth,
            _extend_hash(path_hash, token),
        )
        entries += 1
        child = nodes[child, F_NEXT_SIBLING]
    return size, entries


@njit(cache=True)
def _grow_tree(
    state,
    root,
    node,
    implicit,
    max_path,
    max_nodes,
    truth,
    truth_len,
    work,
    heap,
    hashes,
    out_cumulative,
    out_accepted,
    out_hash,
    out_depth,
    out_on_truth,
):
    """The ``max_nodes`` most probable positions below (``node``, ``implicit``), at most
    ``max_path`` deep, best first: node j's cumulative probability to ``out_cumulative[j]``
    and, to ``out_accepted[j]``, how far ``truth`` runs through nodes 0..j; its path's hash,
    depth and whether it lies on ``truth`` to ``out_hash[j]``, ``out_depth[j]``,
    ``out_on_truth[j]``. Returns the number of nodes (fewer where the tree holds fewer)."""
    size, entries = _push_children(
        state, root, node, implicit, 1.0, 0, True, truth, truth_len, work, heap, 0, 0, hashes, 0
    )
    chosen = 0
    accepted = 0
    while chosen < max_nodes and size > 0:
        entry, size = _heap_pop(heap, size, work[0])
        depth = np.int64(work[3, entry])
        on_truth = work[4, entry] > 0.0
        if on_truth and depth > accepted:
            accepted = depth
        out_cumulative[chosen] = work[0, entry]
        out_accepted[chosen] = accepted
        out_hash[chosen] = hashes[entry]
        out_depth[chosen] = depth
        out_on_truth[chosen] = on_truth
        chosen += 1
        if depth < max_path:
            size, entries = _push_children(
                state,
                root,
                np.int64(work[1, entry]),
                np.int64(work[2, entry]),
                work[0, entry],
                depth,
                on_truth,
                truth,
                truth_len,
                work,
                heap,
                size,
                entries,
                hashes,
                hashes[entry],
            )
    return chosen


@njit(cache=True)
def best_first_tree_rows(
    state,
    roots,
    context_slots,
    match_slots,
    truths,
    truth_lens,
    max_nodes,
    max_path,
    max_spec_factor,
    merge_matches,
    out_cumulative,
    out_accepted,
    out_num,
    out_match,
):
    """Row i: a draft tree below the matches of the context (as :func:`known_continuation_rows`
    finds them). Below each match length m, the ``max_nodes`` most probable positions, paths at
    most ``min(max_path, m * max_spec_factor, max_depth - m)`` deep. Without
    ``merge_matches``, the tree of the match whose nodes' cumulative probabilities sum highest
    (ties: the longer match); with it, the ``max_nodes`` most probable distinct paths of all
    those trees, each valued at its best (ties: the shallower first, so that every prefix of
    the order is a tree; ``out_match`` is then 0).

    Writes the nodes' cumulative probabilities in order to ``out_cumulative[i]``, how far
    ``truths[i, :truth_lens[i]]`` runs through the first j + 1 nodes to ``out_accepted[i,
    j]``, the node count to ``out_num[i]`` and m to ``out_match[i]``. The truth only scores the
    tree: it never shapes it. Reads only (and the match work space ``walks``); writes 0 in
    the rows of ``out_cumulative`` and ``out_accepted`` past a tree's nodes."""
    max_depth = state.max_depth
    work = np.zeros((5, MAX_CANDIDATES))
    heap = np.zeros(MAX_CANDIDATES, np.int64)
    hashes = np.zeros(MAX_CANDIDATES, np.int64)
    # The trees of every match length of a row, one after the other (at most max_nodes each).
    width = max_depth * max_nodes
    cumulative = np.zeros(width)
    accepted = np.zeros(width, np.int64)
    path_hash = np.zeros(width, np.int64)
    depth_of = np.zeros(width, np.int64)
    on_truth = np.zeros(width, np.bool_)
    for i in range(roots.shape[0]):
        out_num[i] = 0
        out_match[i] = 0
        out_cumulative[i, :] = 0.0
        out_accepted[i, :] = 0
        root = roots[i]
        if root < 0 or max_nodes <= 0:
            continue
        low = _match_row(state, root, context_slots[i], match_slots[i])
        best = -1.0
        best_at = 0
        best_num = 0
        total = 0  # positions grown below all matches, side by side
        for m in range(low, 0, -1):
            path = min(max_path, np.int64(m * max_spec_factor + 1e-6), max_depth - m)
            if path <= 0:
                continue
            num = _grow_tree(
                state,
                root,
                state.walks[m, W_MATCH_NODE],
                state.walks[m, W_MATCH_IMPLICIT],
                path,
                max_nodes,
                truths[i],
                truth_lens[i],
                work,
                heap,
                hashes,
                cumulative[total:],
                accepted[total:],
                path_hash[total:],
                depth_of[total:],
                on_truth[total:],
            )
            expected = cumulative[total : total + num].sum()
            if num > 0 and expected > best:
                best, best_at, best_num = expected, total, num
                out_match[i] = m
            total += num
        if merge_matches and total > 0:
            out_match[i] = 0
            out_num[i] = _merge_paths(
                cumulative[:total],
                path_hash[:total],
                depth_of[:total],
                on_truth[:total],
                max_nodes,
                out_cumulative[i],
                out_accepted[i],
            )
        elif best_num > 0:
            out_num[i] = best_num
            out_cumulative[i, :best_num] = cumulative[best_at : best_at + best_num]
            out_accepted[i, :best_num] = accepted[best_at : best_at + best_num]


@njit(cache=True)
def _merge_paths(cumulative, path_hash, depth, on_truth, max_nodes, out_cumulative, out_accepted):
    """The ``max_nodes`` most probable distinct paths among trees grown below several matches
    (a path's value: its best), most probable first, shallower first on ties; writes them as
    :func:`best_first_tree_rows` does and returns their number."""
    by_depth = np.argsort(depth, kind="mergesort")
    order = by_depth[np.argsort(-cumulative[by_depth], kind="mergesort")]
    seen = set()
    seen.add(np.int64(0))  # numba types an empty set by its first element: an int64 set
    seen.discard(np.int64(0))
    chosen = 0
    held = 0
    for e in order:
        if chosen >= max_nodes:
            break
        if path_hash[e] in seen:
            continue
        seen.add(path_hash[e])
        if on_truth[e] and depth[e] > held:
            held = depth[e]
        out_cumulative[chosen] = cumulative[e]
        out_accepted[chosen] = held
        chosen += 1
    return chosen
