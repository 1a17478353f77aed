"""Bands of decoding requests per pass: where in a step (full batch, tail) time goes."""

from __future__ import annotations

import numpy as np

__all__ = ["BAND_EDGES", "band_labels", "band_of"]

# Upper bounds of the bands of decoding requests per pass (the last band is open). A pass that
# only prefills (the step's first) decodes 0 requests.
BAND_EDGES = (1, 8, 32, 128, 512)


def band_labels() -> list[str]:
    """``["0-1", "2-8", ..., "513+"]``, one per band of :data:`BAND_EDGES`."""
    labels, low = [], 0
    for high in BAND_EDGES:
        labels.append(f"{low}-{high}")
        low = high + 1
    return [*labels, f"{low}+"]


def band_of(num_requests: np.ndarray) -> np.ndarray:
    """Index in :func:`band_labels` of each pass's number of decoding requests."""
    return np.searchsorted(np.asarray(BAND_EDGES), num_requests, side="left")
