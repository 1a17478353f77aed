"""Input checks shared by the policies: one place, messages of the form ``name=value must be``."""

from __future__ import annotations

import math

import numpy as np


def check_real(value: float, name: str, minimum: float | None = None) -> float:
    """Return ``value`` as a finite float, optionally ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name}={value!r} must be a real number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name}={value!r} must be finite")
    if minimum is not None and result < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return result


def check_int(value: int, name: str, minimum: int | None = None) -> int:
    """Return ``value`` as an int, optionally ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer")
    result = int(value)
    if minimum is not None and result < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return result


def as_float_vector(values: object, name: str, minimum: float | None = None) -> np.ndarray:
    """Return ``values`` as a 1-D finite float64 array (optionally ``>= minimum``)."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must hold real numbers, got {values!r}") from error
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    integers = isinstance(values, np.ndarray) and values.dtype.kind in "iub"
    if array.size and not integers and not np.all(np.isfinite(array)):  # integers are finite
        bad = float(array[~np.isfinite(array)][0])
        raise ValueError(f"{name} holds a non-finite value {bad!r}")
    if minimum is not None and array.size and array.min() < minimum:
        raise ValueError(f"{name} holds {float(array.min())!r}, values must be >= {minimum}")
    return array
