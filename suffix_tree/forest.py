"""Many depth-bounded suffix trees sharing one set of flat arrays."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from suffix_tree import _draft_kernels as D
from suffix_tree import _kernels as K
from suffix_tree import _tree_draft_kernels as T
from suffix_tree._state import FIELDS, ForestState, array_addresses, entry_point
from suffix_tree.draft import Draft, DraftBatch
from suffix_tree.validation import check_positive_int, check_probability, to_token_array

logger = logging.getLogger(__name__)

DEFAULT_MAX_DEPTH = 24
_APPEND_CHUNK = 256  # bounds the worst-case node reservation of one kernel call
_NO_FACTOR_LIMIT = 1e9
# Draft tokens of speculate calls, one region after the other, before new buffers are needed:
# 48 KiB (int32 tokens and float64 probabilities), which a draft keeps alive while it lives.
_DRAFT_REGION = 4096
_INT32 = np.dtype(np.int32)
_NDARRAY = np.ndarray  # a module global: one lookup less on the per-call path
# Shared by every empty draft (a Draft is read-only; these cannot be written).
_NO_TOKENS = np.zeros(0, np.int32)
_NO_TOKENS.flags.writeable = False
_NO_PROBS = np.zeros(0, np.float64)
_NO_PROBS.flags.writeable = False
# speculate_many splits its rows among threads only in chunks of at least this many: handing
# a chunk to a thread and back costs tens of microseconds, a lookup a few.
MIN_ROWS_PER_THREAD = 32
SCRATCH_FIELDS = ("scratch_tokens", "scratch_probs", "walks", "walk_scores")


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """Bytes held by a forest, by part (allocated capacity, not just live entries)."""

    nodes: int
    edges: int
    tokens: int
    sequences: int
    num_live_nodes: int
    num_stored_tokens: int

    @property
    def total(self) -> int:
        return self.nodes + self.edges + self.tokens + self.sequences

    @property
    def bytes_per_token(self) -> float:
        return self.total / max(1, self.num_stored_tokens)


class SuffixForest:
    """Depth-bounded suffix trees over int32 token sequences, one tree per key.

    All trees share one node pool, one edge hash table and one token pool, so a tree costs one
    root node until it holds tokens: thousands of small per-prompt trees are cheap.

    Lifecycle of a sequence: :meth:`append` (creates it in ``tree`` on first use, then extends it
    token by token), :meth:`remove` (deletes all its occurrences, no rebuild). Queries:
    :meth:`speculate`. Debugging: :meth:`check_integrity`, :meth:`memory`.
    """

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH, initial_nodes: int = 1024) -> None:
        self.max_depth = check_positive_int(max_depth, "max_depth")
        if self.max_depth > 1024:
            raise ValueError(f"max_depth={max_depth} must be <= 1024")
        self._nodes = np.zeros((max(16, initial_nodes), K.NUM_FIELDS), dtype=np.int32)
        self._edge_keys = np.full(_pow2_at_least(2 * initial_nodes), K.EMPTY, dtype=np.int64)
        self._edge_vals = np.zeros(self._edge_keys.shape[0], dtype=np.int32)
        self._meta = np.zeros(K.NUM_META, dtype=np.int64)
        self._meta[K.M_FREE_HEAD] = -1
        self._pool = np.zeros(4096, dtype=np.int32)
        self._pool_used = 0
        self._pool_live = 0
        num_slots = 16
        self._seq_start = np.zeros(num_slots, dtype=np.int64)
        self._seq_len = np.zeros(num_slots, dtype=np.int64)
        self._seq_cap = np.zeros(num_slots, dtype=np.int64)
        self._seq_root = np.full(num_slots, -1, dtype=np.int64)
        self._seq_alive = np.zeros(num_slots, dtype=np.bool_)
        self._active_node = np.zeros((num_slots, self.max_depth), dtype=np.int32)
        self._active_depth = np.zeros((num_slots, self.max_depth), dtype=np.int32)
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[Hashable, int] = {}
        self._tree_of_seq: dict[Hashable, Hashable] = {}
        self._root_of: dict[Hashable, int] = {}
        self._seqs_in_tree: dict[Hashable, set[Hashable]] = {}
        # Drafts of speculate are views of these, written one after the other (_draft_kernels).
        self._draft_tokens = np.zeros(_DRAFT_REGION, dtype=np.int32)
        self._draft_probs = np.zeros(_DRAFT_REGION, dtype=np.float64)
        self._scratch_tokens = np.zeros((self.max_depth + 1, 64), dtype=np.int32)
        self._scratch_probs = np.zeros((self.max_depth + 1, 64), dtype=np.float64)
        self._draft_capacity = 64  # the largest budget the scratch buffers hold
        self._walks = np.zeros((self.max_depth + 1, D.NUM_WALK_FIELDS), dtype=np.int64)
        self._walk_scores = np.zeros((self.max_depth + 1, D.NUM_SCORE_FIELDS), dtype=np.float64)
        self._state = self._build_state()
        self._lookup_states: list[ForestState] = []  # see _thread_states
        warm_up_kernels()
        # The two per-call kernels, called without numba's argument typing (see entry_point).
        self._append_tokens = entry_point(K.append_tokens)
        self._speculate_one = entry_point(D.speculate_one)

    def _build_state(self) -> ForestState:
        """The record of the current arrays that every kernel takes. Invariant: rebuilt
        (``self._state = self._build_state()``) right after any array attribute is replaced."""
        return ForestState(*(getattr(self, "_" + name) for name in FIELDS[:-1]), self.max_depth)

    # ----------------------------------------------------------------------------- trees
    @property
    def num_trees(self) -> int:
        return len(self._root_of)

    @property
    def num_sequences(self) -> int:
        return len(self._slot_of)

    def has_tree(self, tree: Hashable) -> bool:
        return tree in self._root_of

    def _root(self, tree: Hashable) -> int:
        root = self._root_of.get(tree)
        if root is None:
            self._reserve_nodes(1)
            root = int(K.alloc_node(self._state, -1, -1, 0))
            self._root_of[tree] = root
            self._seqs_in_tree[tree] = set()
        return root

    def drop_tree(self, tree: Hashable) -> None:
        """Remove every sequence of ``tree`` and free all its nodes, its root included.

        O(nodes of the tree): the nodes are freed in one walk, no sequence's suffixes walked.
        """
        if tree not in self._root_of:
            raise ValueError(f"tree={tree!r} is not in this forest")
        for seq_id in self._seqs_in_tree.pop(tree):
            del self._tree_of_seq[seq_id]
            self._release_slot(self._slot_of.pop(seq_id))
        K.free_tree(self._state, self._root_of.pop(tree))

    # ------------------------------------------------------------------------- sequences
    def sequence_length(self, seq_id: Hashable) -> int:
        return int(self._seq_len[self._slot(seq_id)])

    def sequence_tokens(self, seq_id: Hashable) -> np.ndarray:
        """A copy of the tokens stored for ``seq_id``."""
        slot = self._slot(seq_id)
        start = self._seq_start[slot]
        return self._pool[start : start + self._seq_len[slot]].copy()

    def append(
        self, seq_id: Hashable, tokens: Iterable[int] | np.ndarray, tree: Hashable = 0
    ) -> None:
        """Append ``tokens`` to sequence ``seq_id``; a new id starts a sequence in ``tree``.

        O(max_depth) amortized per token. ``tree`` must match the sequence's tree if it exists.
        """
        # Fast path, one kernel call: a C-contiguous, writeable, aligned int32 array (the exact
        # type the kernel is compiled for) that fits the arrays as they are; the kernel checks
        # for negative tokens and room itself and changes nothing when it refuses.
        slot = self._slot_of.get(seq_id)
        if slot is None:
            array = to_token_array(tokens, "tokens")  # checked before the sequence exists
            slot = self._new_sequence(seq_id, tree)
        else:
            if self._tree_of_seq[seq_id] != tree:
                raise ValueError(
                    f"seq_id={seq_id!r} belongs to tree={self._tree_of_seq[seq_id]!r}, "
                    f"not tree={tree!r}"
                )
            fast = type(tokens) is _NDARRAY and tokens.dtype is _INT32 and tokens.ndim == 1
            if fast and not tokens.flags.carray:
                fast = False
            array = tokens if fast else to_token_array(tokens, "tokens")
        status = self._append_tokens(self._state, slot, array)
        if status == K.APPENDED:
            return
        if status == K.NEGATIVE_TOKEN:
            to_token_array(array.copy(), "tokens")  # raises, naming the negative token
        for begin in range(0, array.size, _APPEND_CHUNK):
            chunk = array[begin : begin + _APPEND_CHUNK]
            self._reserve_sequence(slot, chunk.size)
            self._reserve_nodes(2 * self.max_depth * chunk.size)
            status = K.append_tokens(self._state, slot, chunk)
            assert status == K.APPENDED, f"append kernel refused a reserved chunk: {status}"

    def remove(self, seq_id: Hashable) -> None:
        """Remove all occurrences of ``seq_id`` from its tree (O(length * max_depth))."""
        slot = self._slot(seq_id)
        tree = self._tree_of_seq.pop(seq_id)
        del self._slot_of[seq_id]
        K.remove_sequence(self._state, slot)
        self._release_slot(slot)
        self._seqs_in_tree[tree].discard(seq_id)

    def _release_slot(self, slot: int) -> None:
        """Return a sequence slot whose occurrences are gone from its tree to the free list."""
        self._seq_len[slot] = 0
        self._pool_live -= int(self._seq_cap[slot])
        self._seq_cap[slot] = 0
        self._seq_alive[slot] = False
        self._seq_root[slot] = -1
        self._free_slots.append(slot)

    def _slot(self, seq_id: Hashable) -> int:
        slot = self._slot_of.get(seq_id)
        if slot is None:
            raise ValueError(f"seq_id={seq_id!r} is not in this forest")
        return slot

    def _new_sequence(self, seq_id: Hashable, tree: Hashable) -> int:
        if not self._free_slots:
            self._grow_slots()
        slot = self._free_slots.pop()
        root = self._root(tree)
        self._slot_of[seq_id] = slot
        self._tree_of_seq[seq_id] = tree
        self._seqs_in_tree[tree].add(seq_id)
        self._seq_alive[slot] = True
        self._seq_root[slot] = root
        self._seq_len[slot] = 0
        self._seq_cap[slot] = 0
        self._seq_start[slot] = self._pool_used
        return slot

    # -------------------------------------------------------------------------- queries
    def speculate(
        self,
        context: Iterable[int] | np.ndarray,
        max_tokens: int,
        tree: Hashable = 0,
        min_token_prob: float = 0.1,
        max_spec_factor: float | None = None,
    ) -> Draft:
        """Draft a continuation of ``context`` from ``tree``.

        Every suffix of the last ``max_depth`` context tokens that occurs in the tree is tried;
        from each, the walk follows the most frequent child (ties: smaller token) and stops at
        ``max_tokens`` (or ``match_len * max_spec_factor``), when the cumulative probability
        drops below ``min_token_prob``, or at depth ``max_depth``. The best score wins, ties to
        the longer match. An empty context or an unknown/empty tree gives an empty draft.
        """
        # The per-call path: the argument types the kernel is compiled for (a C-contiguous,
        # writeable, aligned int32 context, an int budget, a float probability) go straight to it;
        # it checks the values itself and refuses (begin < 0) what the checked path must handle:
        # a bad value (raised there), a budget beyond the buffers, a full draft buffer.
        if (
            type(context) is _NDARRAY
            and context.dtype is _INT32
            and context.ndim == 1
            and context.flags.carray
            and type(max_tokens) is int
            and type(min_token_prob) is float
            and (max_spec_factor is None or type(max_spec_factor) is float)
        ):
            root = self._root_of.get(tree)
            if root is not None:
                begin, end, match_len, score = self._speculate_one(
                    self._state,
                    root,
                    context,
                    max_tokens,
                    min_token_prob,
                    _NO_FACTOR_LIMIT if max_spec_factor is None else max_spec_factor,
                )
                if end > begin:
                    # Views: the kernel never writes a region again once it returned it.
                    return Draft(
                        self._draft_tokens[begin:end],
                        self._draft_probs[begin:end],
                        score,
                        match_len,
                    )
                if begin >= 0:
                    return Draft(_NO_TOKENS, _NO_PROBS, score, match_len)
        return self._speculate_checked(context, max_tokens, tree, min_token_prob, max_spec_factor)

    def _speculate_checked(
        self,
        context: Iterable[int] | np.ndarray,
        max_tokens: int,
        tree: Hashable,
        min_token_prob: float,
        max_spec_factor: float | None,
    ) -> Draft:
        """:meth:`speculate` for any argument types: validates (``ValueError`` naming the value),
        makes room in the draft buffers, then calls the kernel."""
        max_tokens = check_positive_int(max_tokens, "max_tokens")
        min_token_prob = check_probability(min_token_prob, "min_token_prob")
        if max_spec_factor is None:
            factor = _NO_FACTOR_LIMIT
        else:
            factor = float(max_spec_factor)
            if not factor > 0:
                raise ValueError(f"max_spec_factor={max_spec_factor} must be > 0")
        context = to_token_array(context, "context")
        root = self._root_of.get(tree)
        if root is None:
            return Draft.empty()
        if max_tokens > self._draft_capacity:
            self._grow_draft_buffers(max_tokens)
        if self._meta[K.M_DRAFT_CURSOR] + max_tokens > self._draft_tokens.shape[0]:
            self._new_draft_region(max_tokens)
        begin, end, match_len, score = self._speculate_one(
            self._state, root, context, max_tokens, min_token_prob, factor
        )
        assert begin >= 0, "speculate kernel refused checked arguments"
        if end > begin:
            return Draft(
                self._draft_tokens[begin:end], self._draft_probs[begin:end], score, match_len
            )
        return Draft(_NO_TOKENS, _NO_PROBS, score, match_len)

    # ---------------------------------------------------------------------- batch APIs
    # Handles are the internal ints behind ids: a sequence's slot (valid until it is removed) and
    # a tree's root (valid until the tree is dropped). Engines that call every decode step use
    # these to drive whole batches through one kernel call.
    def sequence_handle(self, seq_id: Hashable) -> int:
        """The slot of ``seq_id``, for :meth:`append_many` and :meth:`speculate_many`."""
        return self._slot(seq_id)

    def tree_handle(self, tree: Hashable) -> int:
        """The root of ``tree``, or -1 if it does not exist (drafts from -1 are empty)."""
        return self._root_of.get(tree, -1)

    def append_many(self, slots: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> None:
        """Append ``tokens[offsets[i]:offsets[i + 1]]`` to the sequence with slot ``slots[i]``."""
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        tokens = to_token_array(tokens, "tokens")
        if slots.ndim != 1:
            raise ValueError(f"slots={slots!r} must be one-dimensional")
        status = (
            K.check_rows(self._seq_alive, slots, offsets, tokens.size)
            if offsets.ndim == 1
            else K.ROWS_BAD_OFFSETS
        )
        if status == K.ROWS_BAD_OFFSETS:
            raise ValueError(f"offsets={offsets!r} must run from 0 to len(tokens) per slot")
        if status == K.ROWS_DECREASING:
            raise ValueError(f"offsets={offsets!r} must be non-decreasing")
        if status == K.ROWS_NOT_LIVE:
            raise ValueError(f"slots={slots!r} holds a slot that is not a live sequence")
        if status == K.ROWS_REPEATED:
            raise ValueError(f"slots={slots!r} holds a slot twice")
        counts = np.diff(offsets)
        grow = np.flatnonzero(self._seq_len[slots] + counts > self._seq_cap[slots])
        for row in grow:
            self._reserve_sequence(int(slots[row]), int(counts[row]))
        # Rows in groups of at most _APPEND_CHUNK * 16 tokens bound the node reservation.
        group_starts = np.searchsorted(offsets, np.arange(0, tokens.size, _APPEND_CHUNK * 16))
        bounds = [*sorted(set(group_starts.tolist()) | {0}), slots.size]
        for first, last in itertools.pairwise(bounds):
            if last > first:
                self._append_rows(slots[first:last], tokens, offsets[first : last + 1])

    def _append_rows(self, slots: np.ndarray, tokens: np.ndarray, offsets: np.ndarray) -> None:
        self._reserve_nodes(2 * self.max_depth * int(offsets[-1] - offsets[0]))
        K.append_rows(self._state, slots, tokens, offsets)

    def speculate_many(
        self,
        roots: np.ndarray,
        context_slots: np.ndarray,
        max_tokens: np.ndarray,
        min_token_prob: float = 0.1,
        max_spec_factor: float | None = None,
        threads: int = 1,
        match_slots: np.ndarray | None = None,
    ) -> DraftBatch:
        """Row i: :meth:`speculate` in the tree ``roots[i]``, with the last ``max_depth`` tokens
        of sequence ``context_slots[i]`` as context and ``max_tokens[i]`` (0 = no draft).

        ``threads`` > 1 splits the rows among that many threads (each at least
        ``MIN_ROWS_PER_THREAD`` rows); the drafts are the same whatever the split.
        ``match_slots[i]`` (default: ``context_slots[i]``; -1: none) names a sequence of row
        i's tree that ends with the context, such as a request's live sequence in its prompt's
        tree: its matches are then read off that sequence instead of walked from the root,
        with the same drafts (a slot that does not qualify is walked)."""
        threads = check_positive_int(threads, "threads")
        roots = np.ascontiguousarray(roots, dtype=np.int64)
        context_slots = np.ascontiguousarray(context_slots, dtype=np.int64)
        max_tokens = np.ascontiguousarray(max_tokens, dtype=np.int64)
        match_slots = (
            context_slots
            if match_slots is None
            else np.ascontiguousarray(match_slots, dtype=np.int64)
        )
        rows = roots.shape[0]
        if (
            roots.ndim != 1
            or context_slots.shape != (rows,)
            or max_tokens.shape != (rows,)
            or match_slots.shape != (rows,)
        ):
            raise ValueError(
                "roots, context_slots, max_tokens and match_slots must have one entry per row"
            )
        status, width = D.check_lookup_rows(
            self._seq_alive, self._nodes.shape[0], roots, context_slots, match_slots, max_tokens
        )
        if status == D.LOOKUP_BAD_MATCH_SLOT:
            raise ValueError(f"match_slots={match_slots!r} holds a slot out of range")
        if status == D.LOOKUP_NEGATIVE_BUDGET:
            raise ValueError(f"max_tokens={max_tokens!r} must be >= 0")
        if status == D.LOOKUP_BAD_CONTEXT_SLOT:
            raise ValueError(f"context_slots={context_slots!r} holds a slot that is not live")
        if status == D.LOOKUP_BAD_ROOT:
            raise ValueError(f"roots={roots!r} holds a node beyond the forest's")
        check_probability(min_token_prob, "min_token_prob")
        factor = _NO_FACTOR_LIMIT if max_spec_factor is None else float(max_spec_factor)
        if width > self._draft_capacity:
            self._grow_draft_buffers(width)
        batch = DraftBatch(
            tokens=np.zeros((rows, width), dtype=np.int32),
            probs=np.zeros((rows, width), dtype=np.float64),
            num_tokens=np.zeros(rows, dtype=np.int64),
            scores=np.zeros(rows, dtype=np.float64),
            match_lens=np.zeros(rows, dtype=np.int64),
        )
        if not rows:
            return batch
        parts = max(1, min(threads, rows // MIN_ROWS_PER_THREAD))
        bounds = [0, rows] if parts == 1 else np.linspace(0, rows, parts + 1).astype(int).tolist()
        # One argument list of speculate_rows per chunk, each with its own scratch record.
        calls = [
            (
                state,
                roots[lo:hi],
                context_slots[lo:hi],
                match_slots[lo:hi],
                max_tokens[lo:hi],
                min_token_prob,
                factor,
                *batch.rows(slice(lo, hi)).arrays(),
            )
            for state, (lo, hi) in zip(
                self._thread_states(parts), itertools.pairwise(bounds), strict=True
            )
        ]
        # The first chunk runs here, the others in the pool's threads (none with one part).
        pending = [_lookup_pool(parts - 1).submit(D.speculate_rows, *call) for call in calls[1:]]
        D.speculate_rows(*calls[0])
        for future in pending:
            future.result()
        return batch

    def known_continuations(
        self,
        roots: np.ndarray,
        context_slots: np.ndarray,
        continuations: np.ndarray,
        continuation_lens: np.ndarray,
        max_tokens: np.ndarray,
        max_spec_factor: float | None = None,
        match_slots: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row i: how many leading tokens of ``continuations[i, :continuation_lens[i]]`` the tree
        ``roots[i]`` holds right after some suffix of the context :meth:`speculate_many` would
        use for the row, and after which match length (ties: the longer).

        Where a greedy draft follows the most frequent child, this follows the given tokens
        through any child, within the bounds a draft from each match keeps (``max_tokens[i]``,
        ``max_spec_factor`` times the match, depth ``max_depth``): given what the target will
        produce, the furthest any draft from the tree, linear or tree-shaped, can be accepted.
        Returns (lengths, match lengths), int64 arrays of one entry per row.
        """
        max_tokens = np.ascontiguousarray(max_tokens, dtype=np.int64)
        roots, context_slots, match_slots, continuations, continuation_lens = self._scored_rows(
            roots, context_slots, match_slots, continuations, continuation_lens, max_tokens
        )
        rows = roots.shape[0]
        factor = _NO_FACTOR_LIMIT if max_spec_factor is None else float(max_spec_factor)
        lengths = np.zeros(rows, np.int64)
        matches = np.zeros(rows, np.int64)
        T.known_continuation_rows(
            self._state,
            roots,
            context_slots,
            match_slots,
            continuations,
            continuation_lens,
            max_tokens,
            factor,
            lengths,
            matches,
        )
        return lengths, matches

    def tree_drafts(
        self,
        roots: np.ndarray,
        context_slots: np.ndarray,
        truths: np.ndarray,
        truth_lens: np.ndarray,
        max_nodes: int,
        max_path: int,
        max_spec_factor: float | None = None,
        match_slots: np.ndarray | None = None,
        merge_matches: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row i: a tree-shaped draft for the context :meth:`speculate_many` would use, scored
        against the tokens the target produces next, ``truths[i, :truth_lens[i]]``.

        For each match length m of the context, the draft tree holds the ``max_nodes`` most
        probable positions below the match (a position's probability: the product of its
        path's count ratios), paths at most ``min(max_path, m * max_spec_factor, max_depth -
        m)`` deep; the match whose tree's probabilities sum highest wins (ties: the longer).
        The nodes come best first, so its first j nodes are the best tree of j nodes. With
        ``merge_matches`` the draft holds instead the ``max_nodes`` most probable distinct paths
        of the trees below every match (a path's value: its best; the match length is then 0).

        Returns ``cumulative[rows, max_nodes]`` (each node's probability, in that order),
        ``accepted[rows, max_nodes]`` (how far the truth runs through the first j + 1 nodes:
        what a pass verifying them accepts), the number of nodes and the match length per row.
        The truth scores the trees; it never shapes them.
        """
        max_nodes = check_positive_int(max_nodes, "max_nodes")
        max_path = check_positive_int(max_path, "max_path")
        roots, context_slots, match_slots, truths, truth_lens = self._scored_rows(
            roots, context_slots, match_slots, truths, truth_lens
        )
        rows = roots.shape[0]
        factor = _NO_FACTOR_LIMIT if max_spec_factor is None else float(max_spec_factor)
        cumulative = np.zeros((rows, max_nodes))
        accepted = np.zeros((rows, max_nodes), np.int64)
        num = np.zeros(rows, np.int64)
        matches = np.zeros(rows, np.int64)
        T.best_first_tree_rows(
            self._state,
            roots,
            context_slots,
            match_slots,
            truths,
            truth_lens,
            max_nodes,
            max_path,
            factor,
            bool(merge_matches),
            cumulative,
            accepted,
            num,
            matches,
        )
        return cumulative, accepted, num, matches

    def _scored_rows(
        self,
        roots: np.ndarray,
        context_slots: np.ndarray,
        match_slots: np.ndarray | None,
        truths: np.ndarray,
        truth_lens: np.ndarray,
        max_tokens: np.ndarray | None = None,
    ) -> tuple[np.ndarray, ...]:
        """The rows of :meth:`known_continuations` / :meth:`tree_drafts` as the kernels take
        them, checked (``ValueError`` naming the value)."""
        roots = np.ascontiguousarray(roots, dtype=np.int64)
        context_slots = np.ascontiguousarray(context_slots, dtype=np.int64)
        truths = np.ascontiguousarray(truths, dtype=np.int32)
        truth_lens = np.ascontiguousarray(truth_lens, dtype=np.int64)
        match_slots = (
            np.full_like(context_slots, -1)
            if match_slots is None
            else np.ascontiguousarray(match_slots, dtype=np.int64)
        )
        rows = roots.shape[0]
        budgets = np.zeros(rows, np.int64) if max_tokens is None else max_tokens
        if roots.ndim != 1 or any(
            a.shape != (rows,) for a in (context_slots, match_slots, budgets)
        ):
            raise ValueError(
                "roots, context_slots, match_slots and max_tokens must have one entry per row"
            )
        if truths.ndim != 2 or truths.shape[0] != rows:
            raise ValueError(f"continuations of shape {truths.shape} must have {rows} rows")
        if truth_lens.shape != (rows,) or np.any((truth_lens < 0) | (truth_lens > truths.shape[1])):
            raise ValueError(
                f"continuation_lens={truth_lens!r} must give one length per row, "
                f"each within 0..{truths.shape[1]}"
            )
        status, _ = D.check_lookup_rows(
            self._seq_alive, self._nodes.shape[0], roots, context_slots, match_slots, budgets
        )
        if status != D.LOOKUP_OK:
            raise ValueError(
                f"lookup rows refused (status {status}): roots={roots!r}, "
                f"context_slots={context_slots!r}, match_slots={match_slots!r}, "
                f"max_tokens={budgets!r}"
            )
        return roots, context_slots, match_slots, truths, truth_lens

    def _thread_states(self, count: int) -> list[ForestState]:
        """``count`` kernel records of the current arrays, the first the forest's own, each
        with scratch buffers of its own (for lookups in threads)."""
        if count == 1:
            return [self._state]
        cached = self._lookup_states
        if cached and cached[0] is self._state and len(cached) >= count:
            return cached[:count]
        states = [self._state]
        for _ in range(1, count):
            values = {name: getattr(self, "_" + name) for name in FIELDS[:-1]}
            for name in SCRATCH_FIELDS:
                values[name] = np.zeros_like(values[name])
            states.append(ForestState(*values.values(), self.max_depth))
        self._lookup_states = states
        return states

    # ------------------------------------------------------------------------ debugging
    def check_integrity(self) -> None:
        """Verify the invariants of ``_kernels``; raise ``AssertionError`` naming the first broken.

        Walks every stored suffix again, so it costs as much as re-inserting everything.
        """
        held = array_addresses(self._state)
        for name, address in zip(FIELDS, held, strict=False):
            if address != getattr(self, "_" + name).ctypes.data:
                raise AssertionError(f"the kernels' record holds a replaced {name} array")
        nodes = self._nodes
        high = int(self._meta[K.M_HIGH_WATER])
        live = nodes[:high, K.F_COUNT] >= 0
        roots = np.zeros(high, dtype=bool)
        roots[list(self._root_of.values())] = True
        visits = np.zeros(high, dtype=np.int64)
        bad_seq = K.recount_occurrences(self._state, visits)
        if bad_seq >= 0:
            raise AssertionError(f"a suffix of sequence slot {bad_seq} has no path in its tree")
        counts = nodes[:high, K.F_COUNT].astype(np.int64)
        wrong = np.flatnonzero(live & (counts != visits))
        if wrong.size:
            node = int(wrong[0])
            raise AssertionError(f"node {node}: count {counts[node]} != {visits[node]} occurrences")
        if int(live.sum()) != int(self._meta[K.M_LIVE_NODES]):
            raise AssertionError("live node counter disagrees with the node pool")
        num_edges = 0
        for node in np.flatnonzero(live):
            best = -1
            tokens_seen = set()
            child = int(nodes[node, K.F_FIRST_CHILD])
            while child >= 0:
                num_edges += 1
                token = int(nodes[child, K.F_TOKEN])
                if token in tokens_seen:
                    raise AssertionError(f"node {node} has two children for token {token}")
                tokens_seen.add(token)
                if K.find_child(self._state, node, token) != child:
                    raise AssertionError(f"edge ({node}, {token}) missing from the edge table")
                if best < 0 or (nodes[child, K.F_COUNT], -token) > (
                    nodes[best, K.F_COUNT],
                    -nodes[best, K.F_TOKEN],
                ):
                    best = child
                child = int(nodes[child, K.F_NEXT_SIBLING])
            if int(nodes[node, K.F_BEST_CHILD]) not in (best, K.STALE):
                raise AssertionError(
                    f"node {node}: best child {nodes[node, K.F_BEST_CHILD]} != {best}"
                )
            if not roots[node] and counts[node] < 1:
                raise AssertionError(f"node {node} is live with count {counts[node]}")
            if counts[node] >= 2 and nodes[node, K.F_REF_SEQ] != -1:
                raise AssertionError(f"node {node} has count {counts[node]} and a chain reference")
        if num_edges != int(self._meta[K.M_LIVE_EDGES]):
            raise AssertionError(f"{num_edges} child links but {self._meta[K.M_LIVE_EDGES]} edges")

    def memory(self) -> MemoryReport:
        """Bytes allocated by the forest's arrays, and what they hold."""
        nodes = self._nodes.nbytes
        edges = self._edge_keys.nbytes + self._edge_vals.nbytes
        tokens = self._pool.nbytes
        sequences = sum(
            a.nbytes
            for a in (
                self._seq_start,
                self._seq_len,
                self._seq_cap,
                self._seq_root,
                self._seq_alive,
                self._active_node,
                self._active_depth,
            )
        )
        return MemoryReport(
            nodes=nodes,
            edges=edges,
            tokens=tokens,
            sequences=sequences,
            num_live_nodes=int(self._meta[K.M_LIVE_NODES]),
            num_stored_tokens=int(self._seq_len[self._seq_alive].sum()),
        )

    # -------------------------------------------------------------------------- storage
    def _reserve_nodes(self, extra: int) -> None:
        # The room rule of K.has_room, for `extra` new nodes and edges.
        needed = int(self._meta[K.M_HIGH_WATER]) + extra
        replaced = False
        if needed > self._nodes.shape[0]:
            grown = np.zeros((max(needed, 2 * self._nodes.shape[0]), K.NUM_FIELDS), dtype=np.int32)
            grown[: self._nodes.shape[0]] = self._nodes
            self._nodes = grown
            replaced = True
        edges_needed = int(self._meta[K.M_LIVE_EDGES]) + extra
        capacity = self._edge_keys.shape[0]
        if edges_needed * K.EDGE_LOAD_DEN > K.EDGE_LOAD_NUM * capacity:
            while edges_needed * K.EDGE_LOAD_DEN > K.EDGE_LOAD_NUM * capacity:
                capacity *= 2
            keys = np.full(capacity, K.EMPTY, dtype=np.int64)
            vals = np.zeros(capacity, dtype=np.int32)
            K.rehash(self._edge_keys, self._edge_vals, keys, vals)
            self._edge_keys, self._edge_vals = keys, vals
            replaced = True
        if replaced:
            self._state = self._build_state()

    def _reserve_sequence(self, slot: int, extra: int) -> None:
        length = int(self._seq_len[slot])
        if length + extra <= self._seq_cap[slot]:
            return
        new_cap = max(16, 2 * (length + extra))
        if self._pool_used + new_cap > self._pool.shape[0]:
            if self._pool_live + new_cap <= self._pool.shape[0] // 2:
                self._compact_pool()
            if self._pool_used + new_cap > self._pool.shape[0]:
                grown = np.zeros(max(2 * self._pool.shape[0], self._pool_used + new_cap), np.int32)
                grown[: self._pool_used] = self._pool[: self._pool_used]
                self._pool = grown
                self._state = self._build_state()
        start = int(self._seq_start[slot])
        self._pool[self._pool_used : self._pool_used + length] = self._pool[start : start + length]
        self._seq_start[slot] = self._pool_used
        self._pool_used += new_cap
        self._pool_live += new_cap - int(self._seq_cap[slot])
        self._seq_cap[slot] = new_cap

    def _compact_pool(self) -> None:
        # References into the pool are (slot, position), so moving a sequence is invisible.
        compacted = np.zeros_like(self._pool)
        used = 0
        for slot in np.flatnonzero(self._seq_alive):
            start, length, cap = self._seq_start[slot], self._seq_len[slot], self._seq_cap[slot]
            compacted[used : used + length] = self._pool[start : start + length]
            self._seq_start[slot] = used
            used += cap
        self._pool = compacted
        self._pool_used = used
        self._state = self._build_state()

    def _grow_slots(self) -> None:
        old = self._seq_start.shape[0]
        new = 2 * old

        def grow(array: np.ndarray, fill: int | bool) -> np.ndarray:
            grown = np.full((new, *array.shape[1:]), fill, dtype=array.dtype)
            grown[:old] = array
            return grown

        self._seq_start = grow(self._seq_start, 0)
        self._seq_len = grow(self._seq_len, 0)
        self._seq_cap = grow(self._seq_cap, 0)
        self._seq_root = grow(self._seq_root, -1)
        self._seq_alive = grow(self._seq_alive, False)
        self._active_node = grow(self._active_node, 0)
        self._active_depth = grow(self._active_depth, 0)
        self._free_slots.extend(range(new - 1, old - 1, -1))
        self._state = self._build_state()

    def _grow_draft_buffers(self, size: int) -> None:
        """Scratch buffers for budgets up to ``size`` (doubling), and a draft region that holds
        such a budget."""
        size = max(size, 2 * self._draft_capacity)
        self._scratch_tokens = np.zeros((self.max_depth + 1, size), dtype=np.int32)
        self._scratch_probs = np.zeros((self.max_depth + 1, size), dtype=np.float64)
        self._draft_capacity = size
        self._new_draft_region(size)

    def _new_draft_region(self, max_tokens: int) -> None:
        """Fresh draft buffers, written from index 0. The old ones are left to the drafts that
        hold views of them (a buffer lives as long as one of its drafts)."""
        size = max(_DRAFT_REGION, max_tokens)
        self._draft_tokens = np.zeros(size, dtype=np.int32)
        self._draft_probs = np.zeros(size, dtype=np.float64)
        self._meta[K.M_DRAFT_CURSOR] = 0
        self._state = self._build_state()


_pool: ThreadPoolExecutor | None = None
_pool_owner = (0, 0)  # (process id, workers) of _pool


def _lookup_pool(workers: int) -> ThreadPoolExecutor:
    """The process's lookup threads, at least ``workers`` of them. A forked child (whose copy
    of the pool has no threads) gets a pool of its own."""
    global _pool, _pool_owner
    pid = os.getpid()
    if _pool is None or _pool_owner[0] != pid or _pool_owner[1] < workers:
        if _pool is not None and _pool_owner[0] == pid:
            _pool.shutdown(wait=False)  # its threads end once idle; the new pool has more
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="das-lookup")
        _pool_owner = (pid, workers)
    return _pool


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, (int(n) - 1).bit_length())


_warmed_up = False


def warm_up_kernels() -> None:
    """Compile (or load from numba's cache) every kernel with real inputs, once per process.

    Runs each public operation on a tiny forest with the argument types of real calls, so the
    first real append/speculate/remove pays no compilation.
    """
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    forest = SuffixForest(max_depth=4, initial_nodes=16)
    forest.append("a", [1, 2, 3, 1, 2, 4, 1, 2, 3])
    forest.append("b", [2, 3, 1, 2])
    forest.append("b", np.array([3], np.int32))  # an existing sequence: one kernel call
    forest.speculate([1, 2], max_tokens=4)
    forest.speculate(np.array([2, 3], np.int32), max_tokens=100)  # grows the draft buffers
    slot_b = forest.sequence_handle("b")
    forest.append_many(np.array([slot_b]), np.array([3, 1], np.int32), np.array([0, 2]))
    forest.speculate_many(
        np.array([forest.tree_handle(0)]), np.array([slot_b]), np.array([3]), min_token_prob=0.0
    )
    forest.remove("a")
    forest.append("c", [5, 6], tree=1)
    forest.drop_tree(1)
    forest._reserve_nodes(4 * forest._edge_keys.shape[0])  # forces a rehash
    forest.check_integrity()
