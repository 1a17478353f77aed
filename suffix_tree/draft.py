"""The result of a speculation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Draft:
    """A proposed continuation (treat as read-only; not frozen, to keep construction cheap on
    the per-call path). The arrays of :meth:`SuffixForest.speculate` are views of the forest's
    draft buffers (48 KiB), which no later call writes again; a draft keeps its buffer alive.

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


@dataclass(frozen=True, slots=True)
class DraftBatch:
    """Drafts of many rows at once (row i: ``tokens[i, :num_tokens[i]]``)."""

    tokens: np.ndarray  # int32 [rows, max_tokens]
    probs: np.ndarray  # float64 [rows, max_tokens], per-token conditional probabilities
    num_tokens: np.ndarray  # int64 [rows]
    scores: np.ndarray  # float64 [rows]
    match_lens: np.ndarray  # int64 [rows]

    def __len__(self) -> int:
        return int(self.num_tokens.shape[0])

    def row(self, i: int) -> Draft:
        num = int(self.num_tokens[i])
        return Draft(
            self.tokens[i, :num].copy(),
            self.probs[i, :num].copy(),
            float(self.scores[i]),
            int(self.match_lens[i]),
        )

    def rows(self, index: slice | np.ndarray) -> DraftBatch:
        """The drafts of the rows ``index`` selects (views for a slice, copies otherwise)."""
        return DraftBatch(
            self.tokens[index],
            self.probs[index],
            self.num_tokens[index],
            self.scores[index],
            self.match_lens[index],
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The five arrays in field order (the order of ``speculate_rows``'s outputs)."""
        return (self.tokens, self.probs, self.num_tokens, self.scores, self.match_lens)

    def widened(self, width: int) -> DraftBatch:
        """The same drafts in arrays of at least ``width`` columns (zeros past the old ones)."""
        if self.tokens.shape[1] >= width:
            return self
        tokens = np.zeros((len(self), width), self.tokens.dtype)
        probs = np.zeros((len(self), width), self.probs.dtype)
        tokens[:, : self.tokens.shape[1]] = self.tokens
        probs[:, : self.probs.shape[1]] = self.probs
        return DraftBatch(tokens, probs, self.num_tokens, self.scores, self.match_lens)

    def masked_probs(self) -> np.ndarray:
        """[rows, max_tokens] per-token probabilities, 0 past each row's draft (the arrays may
        hold stale values there: a kernel writes only a row's first ``num_tokens``)."""
        mask = np.arange(self.probs.shape[1])[None, :] < self.num_tokens[:, None]
        return np.where(mask, self.probs, 0.0)

    def cumulative_probs(self) -> np.ndarray:
        """[rows, max_tokens] cumulative acceptance probabilities, 0 past each row's draft."""
        return np.cumprod(self.masked_probs(), axis=1)
