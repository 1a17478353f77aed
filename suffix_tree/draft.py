"""The result of a speculation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Draft:
    """A proposed continuation.

    Attributes:
        tokens: int32 draft tokens, in order.
        probs: per-token conditional probabilities (child count / parent count).
        score: expected number of accepted tokens, the sum of the cumulative probabilities.
        match_len: length of the context suffix the draft continues.
    """

    tokens: np.ndarray
    probs: np.ndarray
    score: float
    match_len: int

    @staticmethod
    def empty() -> Draft:
        return Draft(np.zeros(0, np.int32), np.zeros(0, np.float64), 0.0, 0)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def cumulative_probs(self) -> np.ndarray:
        return np.cumprod(self.probs)
