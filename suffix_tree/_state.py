"""The forest's arrays as one record, the first argument of every kernel in ``_kernels``.

A numba structref: one boxed object crosses the Python/numba boundary per call instead of a dozen
arrays (numba types and unboxes every argument of every call). The record holds references to
the same numpy arrays as :class:`suffix_tree.forest.SuffixForest`, so kernel writes are visible
from Python; its fields are read-only from Python, so the forest builds a new record whenever it
replaces an array (growth by doubling, compaction).

With ``NUMBA_DISABLE_JIT=1`` the kernels run as plain Python and ``ForestState`` is a plain
record with the same fields (a structref proxy cannot be built without the compiler).
"""

from __future__ import annotations

from numba import config, njit, types
from numba.experimental import structref

# Field order is the constructor's argument order.
FIELDS = (
    "nodes",  # int32[capacity, NUM_FIELDS]: one row per node
    "edge_keys",  # int64[power of two]: (parent << 32) | token, EMPTY when free
    "edge_vals",  # int32[same]: child node of each key
    "meta",  # int64[NUM_META]: counters
    "pool",  # int32: the tokens of every sequence
    "seq_start",  # int64[num_slots]: where a slot's tokens start in the pool
    "seq_len",  # int64[num_slots]: tokens stored
    "seq_cap",  # int64[num_slots]: pool room reserved for the slot
    "seq_root",  # int64[num_slots]: root of the slot's tree, -1 for a free slot
    "seq_alive",  # bool[num_slots]
    "active_node",  # int32[num_slots, max_depth]: per growing suffix, deepest node on its path
    "active_depth",  # int32[num_slots, max_depth]: that node's depth
    "draft_tokens",  # int32[>= 4096]: the drafts of speculate_one, one after the other
    "draft_probs",  # float64[same]
    "scratch_tokens",  # int32[max_depth + 1, draft capacity]: row m, the draft from length m
    "scratch_probs",  # float64[max_depth + 1, draft capacity]
    "walks",  # int64[max_depth + 1, NUM_WALK_FIELDS]: per match length, see _draft_kernels
    "walk_scores",  # float64[max_depth + 1, NUM_SCORE_FIELDS]
    "max_depth",  # int64
)

if config.DISABLE_JIT:

    class ForestState:
        """Plain-Python stand-in for the structref when numba's compiler is disabled."""

        __slots__ = FIELDS

        def __init__(self, *values: object) -> None:
            if len(values) != len(FIELDS):
                raise ValueError(f"len(values)={len(values)} must be {len(FIELDS)}")
            for name, value in zip(FIELDS, values, strict=True):
                setattr(self, name, value)

else:

    @structref.register
    class ForestStateType(types.StructRef):
        def preprocess_fields(self, fields):
            # Literal ints (max_depth) would make a new type per value: keep the plain type.
            return tuple((name, types.unliteral(typ)) for name, typ in fields)

    class ForestState(structref.StructRefProxy):
        """The forest's arrays and ``max_depth``, fields as in :data:`FIELDS`."""

        def __new__(cls, *values: object) -> ForestState:
            if len(values) != len(FIELDS):
                raise ValueError(f"len(values)={len(values)} must be {len(FIELDS)}")
            return _new_state(*values)

    structref.define_proxy(ForestState, ForestStateType, FIELDS)

    @njit(cache=True)
    def _new_state(
        nodes,
        edge_keys,
        edge_vals,
        meta,
        pool,
        seq_start,
        seq_len,
        seq_cap,
        seq_root,
        seq_alive,
        active_node,
        active_depth,
        draft_tokens,
        draft_probs,
        scratch_tokens,
        scratch_probs,
        walks,
        walk_scores,
        max_depth,
    ):
        # The one place that lists every field: a cached constructor (the proxy's default one
        # is compiled again in every process).
        return ForestState(
            nodes,
            edge_keys,
            edge_vals,
            meta,
            pool,
            seq_start,
            seq_len,
            seq_cap,
            seq_root,
            seq_alive,
            active_node,
            active_depth,
            draft_tokens,
            draft_probs,
            scratch_tokens,
            scratch_probs,
            walks,
            walk_scores,
            max_depth,
        )


@njit(cache=True)
def array_addresses(state):
    """Data address of every array field, in :data:`FIELDS` order (``max_depth`` left out):
    lets the forest check that the record still holds its current arrays."""
    return (
        state.nodes.ctypes.data,
        state.edge_keys.ctypes.data,
        state.edge_vals.ctypes.data,
        state.meta.ctypes.data,
        state.pool.ctypes.data,
        state.seq_start.ctypes.data,
        state.seq_len.ctypes.data,
        state.seq_cap.ctypes.data,
        state.seq_root.ctypes.data,
        state.seq_alive.ctypes.data,
        state.active_node.ctypes.data,
        state.active_depth.ctypes.data,
        state.draft_tokens.ctypes.data,
        state.draft_probs.ctypes.data,
        state.scratch_tokens.ctypes.data,
        state.scratch_probs.ctypes.data,
        state.walks.ctypes.data,
        state.walk_scores.ctypes.data,
    )


@njit(cache=True)
def max_depth_of(state):
    return state.max_depth


def entry_point(kernel):
    """The compiled machine-code entry of ``kernel`` if it has exactly one compiled signature,
    else ``kernel`` itself (also without JIT).

    Calling a numba dispatcher types every argument first; a structref cannot be typed from C
    (numba has no fingerprint for it), so each call of a dispatcher that takes the record goes
    back into Python to type it, ~1 us. The entry point skips that resolution and only unboxes,
    so its caller must pass exactly the compiled argument types (the forest's per-call paths
    check their arrays' dtype, dimension and flags first, and pass Python ints and floats).
    """
    if config.DISABLE_JIT or len(kernel.signatures) != 1:
        return kernel
    return kernel.overloads[kernel.signatures[0]].entry_point
