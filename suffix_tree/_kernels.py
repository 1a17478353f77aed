"""numba kernels of the suffix forest: the forest's record of arrays (``ForestState``, see
``_state``), ints and arrays in; ints and arrays out; no other Python objects. This module
stores, removes and checks; ``_draft_kernels`` drafts.

Data layout (the fields of the record, owned and grown by :class:`suffix_tree.forest.SuffixForest`):

* ``nodes[int32, (capacity, NUM_FIELDS)]``: one row per node, the fields below. A tree is a root
  node; all trees of a forest share the node pool and the edge table.
* ``edge_keys[int64]`` / ``edge_vals[int32]``: open-addressing hash table (linear probing,
  backward-shift deletion) from ``(parent << 32) | token`` to the child node id. ``EMPTY`` marks a
  free slot. Capacity is a power of two.
* ``meta[int64]``: counters, indexed by the ``M_*`` constants.
* ``pool[int32]`` with ``seq_start[int64]`` / ``seq_len[int64]``: the tokens of every stored
  sequence, addressed by sequence slot.
* ``seq_cap[int64]``: pool room reserved per slot; ``seq_root[int64]``: the slot's tree (-1: free).
* ``active_node`` / ``active_depth[int32, (num_slots, max_depth)]``: per sequence, for each suffix
  that can still grow (start ``j`` among the last ``max_depth`` positions, ring index
  ``j % max_depth``),
  the deepest materialized node on its path and that node's depth.
* ``draft_tokens`` / ``draft_probs``, ``scratch_*``, ``walks``, ``walk_scores``: the output and
  work space of the draft kernels, described in ``_draft_kernels``.

Invariants (checked by :func:`recount_occurrences` through ``SuffixForest.check_integrity``):

1. ``count[x]`` is the number of (sequence, start) occurrences of x's path (length <= max_depth).
2. A node other than a root with ``count == 1`` and no children is a *chain head*: its subtree is
   implicit, namely the continuation of its single occurrence, tokens ``pool[ref_seq][ref_pos:]``
   up to depth ``max_depth`` (``ref_seq == -1``: no continuation yet).
3. A node with ``count >= 2``, or with a child, has every continuation of its occurrences
   materialized as a child. So a chain head's only reference is its own occurrence: removing a
   sequence frees its chain heads and never has to re-point another node.
4. ``best_child[x]`` is x's child with the largest count, ties to the smallest token, or
   ``STALE``: removal marks a node STALE when its best child loses an occurrence, and the draft
   walk rescans a STALE node's children when it reads it (appends leave STALE as is). Rescanning
   on every such decrement dominated ``remove_sequence`` (the removed path mostly follows best
   children; the root alone has up to a vocabulary of children).
5. A node whose count reached 2 has ``ref_seq == -1`` from then on (set when it split), so no
   node ever keeps a reference to a removed sequence.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from suffix_tree._prefetch import prefetch

F_TOKEN = 0
F_COUNT = 1
F_FIRST_CHILD = 2
F_NEXT_SIBLING = 3  # also the free-list link of a freed node
F_BEST_CHILD = 4
F_REF_SEQ = 5
F_REF_POS = 6
NUM_FIELDS = 7

M_HIGH_WATER = 0  # nodes ever handed out from the end of the pool
M_FREE_HEAD = 1  # first freed node, -1 if none
M_LIVE_NODES = 2
M_LIVE_EDGES = 3
M_DRAFT_CURSOR = 4  # draft_tokens / draft_probs before this index hold drafts already handed out
NUM_META = 5

# Status of append_tokens.
APPENDED = 0
NEGATIVE_TOKEN = 1
NEEDS_ROOM = 2

# Status of check_rows.
ROWS_OK = 0
ROWS_BAD_OFFSETS = 1
ROWS_DECREASING = 2
ROWS_NOT_LIVE = 3
ROWS_REPEATED = 4

# The edge table is kept at most EDGE_LOAD_NUM / EDGE_LOAD_DEN full.
EDGE_LOAD_NUM = 3
EDGE_LOAD_DEN = 5

EMPTY = -1
STALE = -2  # best_child not known since a removal (invariant 4)


@njit(cache=True, inline="always")
def _edge_slot(parent, token, mask):
    # Inputs are < 2**31, so neither product overflows int64.
    h = (np.int64(parent) * 2654435761) ^ (np.int64(token) * 40503)
    h ^= h >> 17
    return h & mask


@njit(cache=True, inline="always")
def _edge_key(parent, token):
    return (np.int64(parent) << 32) | np.int64(token)


@njit("boolean(int32[::1])", cache=True)
def has_negative(tokens):
    """Whether any token id is negative: the input check of int32 arrays, without numpy's
    per-call reduction overhead (~2 us for ``min()`` on a short array)."""
    for t in tokens:  # noqa: SIM110 (a plain loop compiles in numba; any(genexpr) does not)
        if t < 0:
            return True
    return False


@njit(cache=True)
def find_child(state, parent, token):
    """Child of ``parent`` along ``token``, or -1."""
    edge_keys = state.edge_keys
    mask = edge_keys.shape[0] - 1
    key = _edge_key(parent, token)
    i = _edge_slot(parent, token, mask)
    while True:
        k = edge_keys[i]
        if k == key:
            return np.int64(state.edge_vals[i])
        if k == EMPTY:
            return np.int64(-1)
        i = (i + 1) & mask


@njit(cache=True)
def _insert_edge(state, parent, token, child):
    # Precondition: the edge is absent and the table has a free slot.
    edge_keys = state.edge_keys
    mask = edge_keys.shape[0] - 1
    i = _edge_slot(parent, token, mask)
    while edge_keys[i] != EMPTY:
        i = (i + 1) & mask
    edge_keys[i] = _edge_key(parent, token)
    state.edge_vals[i] = child
    state.meta[M_LIVE_EDGES] += 1


@njit(cache=True)
def _delete_edge(state, parent, token):
    edge_keys = state.edge_keys
    edge_vals = state.edge_vals
    mask = edge_keys.shape[0] - 1
    key = _edge_key(parent, token)
    i = _edge_slot(parent, token, mask)
    while edge_keys[i] != key:
        i = (i + 1) & mask
    edge_keys[i] = EMPTY
    state.meta[M_LIVE_EDGES] -= 1
    # Backward-shift deletion: move later entries of the probe run into the hole when their
    # home slot does not lie cyclically in (hole, j].
    j = i
    while True:
        j = (j + 1) & mask
        k = edge_keys[j]
        if k == EMPTY:
            return
        home = _edge_slot(k >> 32, k & 0xFFFFFFFF, mask)
        stays = (i < home <= j) if i <= j else (home > i or home <= j)
        if not stays:
            edge_keys[i] = k
            edge_vals[i] = edge_vals[j]
            edge_keys[j] = EMPTY
            i = j


@njit(cache=True)
def rehash(old_keys, old_vals, new_keys, new_vals):
    """Move every edge of the old table into the new (empty) one."""
    mask = new_keys.shape[0] - 1
    for i in range(old_keys.shape[0]):
        k = old_keys[i]
        if k != EMPTY:
            j = _edge_slot(k >> 32, k & 0xFFFFFFFF, mask)
            while new_keys[j] != EMPTY:
                j = (j + 1) & mask
            new_keys[j] = k
            new_vals[j] = old_vals[i]


@njit(cache=True)
def alloc_node(state, token, ref_seq, ref_pos):
    """Take a node from the free list or the end of the pool; count 0, no children."""
    nodes = state.nodes
    meta = state.meta
    node = meta[M_FREE_HEAD]
    if node >= 0:
        meta[M_FREE_HEAD] = nodes[node, F_NEXT_SIBLING]
    else:
        node = meta[M_HIGH_WATER]
        meta[M_HIGH_WATER] += 1
    nodes[node, F_TOKEN] = token
    nodes[node, F_COUNT] = 0
    nodes[node, F_FIRST_CHILD] = -1
    nodes[node, F_NEXT_SIBLING] = -1
    nodes[node, F_BEST_CHILD] = -1
    nodes[node, F_REF_SEQ] = ref_seq
    nodes[node, F_REF_POS] = ref_pos
    meta[M_LIVE_NODES] += 1
    return node


@njit(cache=True)
def free_node(state, node):
    meta = state.meta
    state.nodes[node, F_COUNT] = -1
    state.nodes[node, F_NEXT_SIBLING] = meta[M_FREE_HEAD]
    meta[M_FREE_HEAD] = node
    meta[M_LIVE_NODES] -= 1


@njit(cache=True, inline="always")
def _is_better(nodes, a, b):
    # Order of drafting preference: larger count, then smaller token.
    if b < 0:
        return True
    ca = nodes[a, F_COUNT]
    cb = nodes[b, F_COUNT]
    return ca > cb or (ca == cb and nodes[a, F_TOKEN] < nodes[b, F_TOKEN])


@njit(cache=True)
def _rescan_best_child(nodes, parent):
    best = -1
    child = nodes[parent, F_FIRST_CHILD]
    while child >= 0:
        if _is_better(nodes, child, best):
            best = child
        child = nodes[child, F_NEXT_SIBLING]
    nodes[parent, F_BEST_CHILD] = best


@njit(cache=True)
def _add_child(state, parent, token, ref_seq, ref_pos):
    nodes = state.nodes
    child = alloc_node(state, token, ref_seq, ref_pos)
    nodes[child, F_COUNT] = 1
    nodes[child, F_NEXT_SIBLING] = nodes[parent, F_FIRST_CHILD]
    nodes[parent, F_FIRST_CHILD] = child
    _insert_edge(state, parent, token, child)
    best = nodes[parent, F_BEST_CHILD]
    if best != STALE and _is_better(nodes, child, best):
        nodes[parent, F_BEST_CHILD] = child
    return child


@njit(cache=True)
def _unlink_child(state, parent, child):
    nodes = state.nodes
    prev = -1
    cur = nodes[parent, F_FIRST_CHILD]
    while cur != child:
        prev = cur
        cur = nodes[cur, F_NEXT_SIBLING]
    if prev < 0:
        nodes[parent, F_FIRST_CHILD] = nodes[child, F_NEXT_SIBLING]
    else:
        nodes[prev, F_NEXT_SIBLING] = nodes[child, F_NEXT_SIBLING]
    _delete_edge(state, parent, nodes[child, F_TOKEN])


@njit(cache=True, inline="always")
def _is_chain_head(nodes, node, root):
    return node != root and nodes[node, F_COUNT] == 1 and nodes[node, F_FIRST_CHILD] < 0


@njit(cache=True)
def has_room(state, seq, num_tokens):
    """Whether :func:`append_tokens` of ``num_tokens`` to slot ``seq`` fits without growth:
    pool room reserved for the sequence, and room for the worst case of ``2 * max_depth`` new
    nodes and edges per token, the edge table staying at most EDGE_LOAD_NUM / EDGE_LOAD_DEN
    full."""
    if state.seq_len[seq] + num_tokens > state.seq_cap[seq]:
        return False
    extra = 2 * state.max_depth * num_tokens
    meta = state.meta
    if meta[M_HIGH_WATER] + extra > state.nodes.shape[0]:
        return False
    return (meta[M_LIVE_EDGES] + extra) * EDGE_LOAD_DEN <= EDGE_LOAD_NUM * state.edge_keys.shape[0]


@njit(cache=True)
def append_tokens(state, seq, new_tokens):
    """Append ``new_tokens`` to sequence slot ``seq`` if they are valid and fit.

    Returns APPENDED, or NEGATIVE_TOKEN / NEEDS_ROOM with nothing changed (the caller raises,
    or grows the arrays with :func:`has_room` as the rule, then calls again).
    """
    for t in new_tokens:
        if t < 0:
            return NEGATIVE_TOKEN
    if not has_room(state, seq, new_tokens.shape[0]):
        return NEEDS_ROOM
    _append(state, seq, new_tokens)
    return APPENDED


@njit(cache=True)
def _prefetch_paths(state, seq, n, t):
    # What appending token t at position n of sequence seq reads, requested before it is read,
    # so that the cache misses of its max_depth suffixes overlap instead of following one
    # another: each suffix's active node, the edge it looks up, then the child it finds.
    nodes = state.nodes
    active_node = state.active_node
    active_depth = state.active_depth
    max_depth = state.max_depth
    mask = state.edge_keys.shape[0] - 1
    first = max(0, n - max_depth + 1)
    for j in range(first, n + 1):
        node = active_node[seq, j % max_depth]
        prefetch(nodes, (node, 0))
        if active_depth[seq, j % max_depth] == n - j:
            slot = _edge_slot(node, t, mask)
            prefetch(state.edge_keys, slot)
            prefetch(state.edge_vals, slot)
    for j in range(first, n + 1):
        if active_depth[seq, j % max_depth] == n - j:
            child = find_child(state, active_node[seq, j % max_depth], t)
            if child >= 0:
                prefetch(nodes, (child, 0))


@njit(cache=True)
def _append(state, seq, new_tokens):
    # Precondition: has_room(state, seq, len(new_tokens)).
    nodes = state.nodes
    pool = state.pool
    seq_len = state.seq_len
    active_node = state.active_node
    active_depth = state.active_depth
    max_depth = state.max_depth
    root = state.seq_root[seq]
    start = state.seq_start[seq]
    mask = state.edge_keys.shape[0] - 1
    last = new_tokens.shape[0] - 1
    for k in range(last + 1):
        t = new_tokens[k]
        n = seq_len[seq]
        pool[start + n] = t
        seq_len[seq] = n + 1
        nodes[root, F_COUNT] += 1
        active_node[seq, n % max_depth] = root
        active_depth[seq, n % max_depth] = 0
        if k == 0:
            _prefetch_paths(state, seq, n, t)
        # Longer suffixes first: when a shorter one splits a chain head owned by a longer suffix
        # of this same sequence, that suffix has already absorbed token n implicitly.
        for j in range(max(0, n - max_depth + 1), n + 1):
            ring = j % max_depth
            end_depth = n - j  # path length of suffix j before token n
            node = active_node[seq, ring]
            depth = active_depth[seq, ring]
            # Nodes on our path may have been materialized by other occurrences since we last
            # looked: descend to the deepest one (amortized O(1), each step is permanent).
            while depth < end_depth and nodes[node, F_FIRST_CHILD] >= 0:
                child = find_child(state, node, pool[start + j + depth])
                if child < 0:
                    break
                node = child
                depth += 1
            active_node[seq, ring] = node
            active_depth[seq, ring] = depth
            if depth < end_depth:
                continue  # below our own chain head: token n extends the implicit chain
            if _is_chain_head(nodes, node, root):
                # We are its only occurrence and stop exactly here: continue implicitly.
                nodes[node, F_REF_SEQ] = seq
                nodes[node, F_REF_POS] = n
                continue
            child = find_child(state, node, t)
            if child < 0:
                child = _add_child(state, node, t, seq, n + 1)
            else:
                was_chain_head = _is_chain_head(nodes, child, root)
                nodes[child, F_COUNT] += 1
                best = nodes[node, F_BEST_CHILD]
                if child != best and best != STALE and _is_better(nodes, child, best):
                    nodes[node, F_BEST_CHILD] = child
                if was_chain_head:
                    # Materialize the other occurrence's next token (invariant 3).
                    ref_seq = nodes[child, F_REF_SEQ]
                    ref_pos = nodes[child, F_REF_POS]
                    if ref_seq >= 0 and ref_pos < seq_len[ref_seq] and end_depth + 2 <= max_depth:
                        token = pool[state.seq_start[ref_seq] + ref_pos]
                        _add_child(state, child, token, ref_seq, ref_pos + 1)
                    nodes[child, F_REF_SEQ] = -1
            active_node[seq, ring] = child
            active_depth[seq, ring] = end_depth + 1
            if k < last:  # the edge this suffix looks up for the next token
                slot = _edge_slot(child, new_tokens[k + 1], mask)
                prefetch(state.edge_keys, slot)
                prefetch(state.edge_vals, slot)


@njit(cache=True, inline="always")
def is_live_slot(seq_alive, slot):
    """Whether ``slot`` names a live sequence (a slot out of range does not)."""
    return 0 <= slot < seq_alive.shape[0] and seq_alive[slot]


@njit(cache=True)
def check_rows(seq_alive, slots, offsets, num_tokens):
    """What :func:`append_rows` needs of its rows, checked before anything is stored: ROWS_OK,
    or the first failure found: ``offsets`` not one per row plus one, from 0 to
    ``num_tokens`` (ROWS_BAD_OFFSETS); ``offsets`` decreasing (ROWS_DECREASING); a slot that
    is not a live sequence (ROWS_NOT_LIVE); a slot given twice (ROWS_REPEATED). One pass each,
    where the array calls they replace cost microseconds apiece."""
    rows = slots.shape[0]
    if offsets.shape[0] != rows + 1 or offsets[0] != 0 or offsets[rows] != num_tokens:
        return ROWS_BAD_OFFSETS
    for i in range(rows):
        if offsets[i + 1] < offsets[i]:
            return ROWS_DECREASING
    for i in range(rows):
        if not is_live_slot(seq_alive, slots[i]):
            return ROWS_NOT_LIVE
    ordered = np.sort(slots)
    for i in range(1, rows):
        if ordered[i] == ordered[i - 1]:
            return ROWS_REPEATED
    return ROWS_OK


@njit(cache=True)
def append_rows(state, slots, tokens, offsets):
    """Append ``tokens[offsets[i]:offsets[i + 1]]`` to sequence slot ``slots[i]``, for every i.

    Precondition (ensured by the caller): room for all rows together, as :func:`has_room`
    counts it.
    """
    for i in range(slots.shape[0]):
        if offsets[i + 1] > offsets[i]:
            _append(state, slots[i], tokens[offsets[i] : offsets[i + 1]])


@njit(cache=True)
def remove_sequence(state, seq):
    """Remove every occurrence of sequence slot ``seq`` from its tree."""
    nodes = state.nodes
    pool = state.pool
    max_depth = state.max_depth
    root = state.seq_root[seq]
    start = state.seq_start[seq]
    length = state.seq_len[seq]
    for j in range(length):
        nodes[root, F_COUNT] -= 1
        node = root
        for p in range(j, min(length, j + max_depth)):
            child = find_child(state, node, pool[start + p])
            if child < 0:
                break  # the rest of this suffix was implicit below a chain head we freed
            remaining = nodes[child, F_COUNT] - 1
            nodes[child, F_COUNT] = remaining
            if remaining == 0:
                _unlink_child(state, node, child)
                # Freed nodes are not reused during this call, so walking on through `child`
                # (whose own edges are still in the table) stays valid.
                free_node(state, child)
            # A node that falls back to count 1 and loses its children becomes a chain head
            # with ref_seq == -1 (invariant 5): its remaining occurrence ends at it.
            if nodes[node, F_BEST_CHILD] == child:
                nodes[node, F_BEST_CHILD] = STALE  # rescanned when a draft reads it
            node = child
    state.seq_len[seq] = 0


@njit(cache=True)
def free_tree(state, root):
    """Free every node and edge of the tree at ``root``, the root included.

    For a tree none of whose sequences outlives it: no count is decremented, no child list
    unlinked. It walks the tree once, O(nodes), where removing each sequence walks every
    suffix of it. A node taken off the work list has had its edge deleted; the work list is
    threaded through the ``F_REF_POS`` of the nodes on it (they are freed, so the field is
    free to reuse), and a node's children are read before the node is freed.
    """
    nodes = state.nodes
    pending = root
    nodes[root, F_REF_POS] = -1
    while pending >= 0:
        node = pending
        pending = nodes[node, F_REF_POS]
        child = nodes[node, F_FIRST_CHILD]
        while child >= 0:
            _delete_edge(state, node, nodes[child, F_TOKEN])
            nodes[child, F_REF_POS] = pending
            pending = child
            child = nodes[child, F_NEXT_SIBLING]
        free_node(state, node)


@njit(cache=True)
def recount_occurrences(state, visits):
    """Re-walk every suffix of every live sequence, counting visits per materialized node.

    Returns -1 if all walks succeed, else the slot of the first sequence whose path is missing.
    Integrity holds when ``visits`` then equals ``count`` for every live node (invariant 1).
    """
    nodes = state.nodes
    pool = state.pool
    seq_start = state.seq_start
    seq_len = state.seq_len
    max_depth = state.max_depth
    for seq in range(state.seq_alive.shape[0]):
        if not state.seq_alive[seq]:
            continue
        root = state.seq_root[seq]
        start = seq_start[seq]
        length = seq_len[seq]
        for j in range(length):
            visits[root] += 1
            node = root
            implicit = 0
            for p in range(j, min(length, j + max_depth)):
                t = pool[start + p]
                if implicit > 0 or _is_chain_head(nodes, node, root):
                    ref_seq = nodes[node, F_REF_SEQ]
                    pos = nodes[node, F_REF_POS] + implicit
                    if ref_seq < 0 or pos >= seq_len[ref_seq]:
                        return seq
                    if pool[seq_start[ref_seq] + pos] != t:
                        return seq
                    implicit += 1
                else:
                    child = find_child(state, node, t)
                    if child < 0:
                        return seq
                    node = child
                    visits[node] += 1
    return -1
