"""The prefetch hint: it compiles to a prefetch instruction, reads and writes nothing, and the
append kernels issue it (their speed on large trees depends on it; their results are the
oracle tests' business)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from numba import int32, int64, njit, typeof

from suffix_tree import SuffixForest, _kernels
from suffix_tree._prefetch import prefetch

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="tests compiled code"
)


@njit
def _prefetch_and_sum(flat, grid, far):
    prefetch(flat, 3)
    prefetch(grid, (np.int32(1), 2))  # mixed index types, one per dimension
    prefetch(flat, far)  # out of range: a hint, never a fault
    return flat.sum() + grid.sum()


def _prefetch_calls(kernel) -> int:
    return sum(
        "call void @llvm.prefetch" in line
        for signature in kernel.signatures
        for line in kernel.inspect_llvm(signature).splitlines()
    )


def _fresh_prefetch_calls(kernel, signature: tuple) -> int:
    # Compiled anew, not loaded from numba's cache: the code of a cached kernel cannot be
    # inspected.
    fresh = njit(kernel.py_func)
    fresh.compile(signature)
    return _prefetch_calls(fresh)


def test_prefetch_compiles_to_prefetches_and_changes_nothing():
    flat = np.arange(8, dtype=np.int64)
    grid = np.arange(12, dtype=np.int32).reshape(3, 4)
    before = flat.copy(), grid.copy()
    assert _prefetch_and_sum(flat, grid, 1 << 40) == 28 + 66
    np.testing.assert_array_equal(flat, before[0])
    np.testing.assert_array_equal(grid, before[1])
    assert _prefetch_calls(_prefetch_and_sum) == 3


def test_the_append_kernel_prefetches_a_rows_paths_and_each_next_tokens_edges():
    state = typeof(SuffixForest()._state)
    ahead = _fresh_prefetch_calls(_kernels._prefetch_paths, (state, int64, int64, int32))
    append = _fresh_prefetch_calls(_kernels._append, (state, int64, int32[::1]))
    assert ahead >= 3  # before a row's first token: active nodes, their edges, the children
    assert append > ahead  # that, and along the way the edge each suffix looks up next
