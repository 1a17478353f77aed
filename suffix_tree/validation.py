"""Input checks shared by the public classes: one place, messages that name the value."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from suffix_tree._kernels import has_negative

INT32_MAX = np.iinfo(np.int32).max


def to_token_array(tokens: Iterable[int] | np.ndarray, name: str) -> np.ndarray:
    """Return ``tokens`` as a contiguous int32 array; ``ValueError`` naming any bad value."""
    if type(tokens) is np.ndarray and tokens.dtype == np.int32 and tokens.ndim == 1:
        # Fast path for the hot case (habit 4: int32 arrays in): the exact type the kernels are
        # compiled for, so no copy and only the negative check; same result and errors as below.
        flags = tokens.flags
        if flags.c_contiguous and flags.writeable and flags.aligned:
            if has_negative(tokens):
                raise ValueError(f"{name} holds a negative token id {int(tokens.min())}")
            return tokens
    if isinstance(tokens, np.ndarray):
        array = tokens
    else:
        if isinstance(tokens, (str, bytes)):
            raise ValueError(f"{name} must be a sequence of token ids, got {tokens!r}")
        items = list(tokens)
        for item in items:
            if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
                raise ValueError(f"{name} must hold integers, got {item!r}")
        array = np.asarray(items, dtype=np.int64) if items else np.zeros(0, np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.size:
        low, high = array.min(), array.max()
        if low < 0:
            raise ValueError(f"{name} holds a negative token id {int(low)}")
        if high > INT32_MAX:
            raise ValueError(f"{name} holds token id {int(high)} beyond int32")
    flags = array.flags
    if array.dtype != np.int32 or not (flags.c_contiguous and flags.writeable and flags.aligned):
        # Always the array type the kernels were warmed up with: a read-only (e.g. a trace's
        # frozen tokens) or unaligned input would make numba compile a second specialization of
        # every kernel it reaches, seconds on first use.
        array = np.array(array, dtype=np.int32, order="C")
    return array


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0")
    return int(value)


def check_probability(value: float, name: str) -> float:
    if not isinstance(value, (int, float, np.floating)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a probability in [0, 1]")
    return float(value)
