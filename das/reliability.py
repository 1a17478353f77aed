"""Reliability calibration: maps a draft's predicted cumulative acceptance to the observed one.

:class:`~das.drafter.AcceptanceCalibration` scales each draft token's conditional probability
by one factor per (source, match-length bucket): it gets the average right but not the shape.
On replayed rollouts its cumulative predictions are compressed toward the middle: drafts
predicted at 0.1-0.3 were accepted 2-11% of the time, drafts predicted at 0.7-0.9 85-97%.
A budget policy that trades draft tokens against step time needs the shape: it drafts where
the real probability is high.

This layer keeps, per bin of predicted cumulative probability, how often the draft's prefix up
to that position was accepted (every drafted position's outcome is known once the draft is
verified: accepted before the first rejection, not from it on). The map is the weighted
isotonic (non-decreasing) fit of those rates, shrunk toward the identity where a bin has
little data, and interpolated between bin centres. Counts decay every RL step, as the
(source, bucket) factors do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_BINS = 20


def isotonic_increasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit of ``values`` (pool adjacent violators)."""
    means: list[float] = []
    totals: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(values.tolist(), weights.tolist(), strict=True):
        means.append(value)
        totals.append(weight)
        sizes.append(1)
        # Invariant: the blocks' means are non-decreasing once the new block is merged back.
        while len(means) > 1 and means[-2] > means[-1]:
            weight_sum = totals[-2] + totals[-1]
            merged = (means[-2] * totals[-2] + means[-1] * totals[-1]) / weight_sum
            means[-2:] = [merged]
            totals[-2:] = [weight_sum]
            sizes[-2:] = [sizes[-2] + sizes[-1]]
    return np.repeat(np.array(means), sizes)


class ReliabilityCalibration:
    """Observed acceptance per bin of predicted cumulative acceptance, as a monotone map.

    Args:
        prior: pseudo-observations per bin at the identity (the prediction itself).
        decay: factor on every count at each new RL step.
    """

    def __init__(self, prior: float = 20.0, decay: float = 0.5) -> None:
        if prior <= 0:
            raise ValueError(f"prior={prior!r} must be > 0")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay={decay!r} must be in (0, 1]")
        self.prior = float(prior)
        self.decay = float(decay)
        self.accepted = np.zeros(NUM_BINS)
        self.tried = np.zeros(NUM_BINS)
        self._centres = (np.arange(NUM_BINS) + 0.5) / NUM_BINS
        self._map: np.ndarray | None = None  # fitted rates at the bin centres; None: refit

    @staticmethod
    def bins(predicted: np.ndarray) -> np.ndarray:
        """Bin index of each predicted probability in [0, 1]."""
        scaled = np.asarray(predicted, dtype=np.float64) * NUM_BINS
        return np.clip(scaled.astype(np.int64), 0, NUM_BINS - 1)

    def record(self, predicted: np.ndarray, num_accepted: int) -> None:
        """One verified draft: ``predicted[j]`` was its cumulative prediction for position
        ``j``; its first ``num_accepted`` positions were accepted and the rest were not."""
        self.record_many([predicted], [num_accepted])

    def record_many(
        self, predicted: Sequence[np.ndarray], num_accepted: Sequence[int] | np.ndarray
    ) -> None:
        """Many verified drafts at once, each as in :meth:`record`."""
        lengths = np.fromiter((len(p) for p in predicted), np.int64, len(predicted))
        matrix = np.zeros((len(predicted), int(lengths.max(initial=0))))
        for row, values in enumerate(predicted):
            matrix[row, : len(values)] = values
        self.record_rows(matrix, lengths, np.asarray(num_accepted, np.int64))

    def record_rows(
        self, predicted: np.ndarray, num_tokens: np.ndarray, num_accepted: np.ndarray
    ) -> None:
        """Many verified drafts, as rows of a matrix: row i's draft is
        ``predicted[i, :num_tokens[i]]`` (one pass over all their positions: this runs for
        every drafting request of every engine step)."""
        columns = np.arange(predicted.shape[1])[None, :]
        within = columns < np.asarray(num_tokens)[:, None]
        if not within.any():
            return
        bins = self.bins(predicted[within])  # row-major: the drafts one after the other
        accepted = (columns < np.asarray(num_accepted)[:, None])[within]
        self.tried += np.bincount(bins, minlength=NUM_BINS)
        self.accepted += np.bincount(bins[accepted], minlength=NUM_BINS)
        self._map = None

    def new_step(self) -> None:
        self.accepted *= self.decay
        self.tried *= self.decay
        self._map = None

    def rates(self) -> np.ndarray:
        """The fitted acceptance at each bin centre (non-decreasing)."""
        if self._map is None:
            weights = self.tried + self.prior
            observed = (self.accepted + self.prior * self._centres) / weights
            self._map = isotonic_increasing(observed, weights)
        return self._map

    def apply(self, cumulative: np.ndarray) -> np.ndarray:
        """[rows, K] recalibrated cumulative probabilities, non-increasing along each row and
        0 wherever the input is 0 (past a draft's end)."""
        cumulative = np.asarray(cumulative, dtype=np.float64)
        if not cumulative.size:
            return cumulative
        mapped = np.interp(cumulative, self._centres, self.rates())
        mapped = np.where(cumulative > 0, mapped, 0.0)
        # Invariant: a draft's cumulative acceptance never rises along the draft.
        return np.minimum.accumulate(mapped, axis=-1)
