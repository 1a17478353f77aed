"""What an engine step looks like to a cost model: one row per step, plain arrays.

A replay (or a live engine) describes each step it ran by its shape; any cost model prices a
sequence of shapes with ``cost.times(shapes)``. Keeping the shape apart from the model lets the
same replay be priced by a fitted roofline, a measured table or a machine's own curve.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["StepShapes"]


@dataclass(frozen=True, slots=True)
class StepShapes:
    """Shapes of ``len(self)`` engine steps; every field is an int64 array of that length.

    Attributes:
        num_tokens: tokens the step's forward pass verifies for decoding requests:
            ``sum_i (1 + k_i)`` over the running requests, ``k_i`` request i's draft length.
        draft_tokens: ``sum_i k_i``, the draft tokens among ``num_tokens``.
        num_requests: decoding requests in the step (the batch size).
        kv_tokens: ``sum_i L_i``, each decoding request's context length (prompt + output so
            far): the KV-cache entries attention reads, each request's cache read once.
        context_tokens: ``sum_i (1 + k_i) * L_i``: KV entries weighted by the tokens that attend
            to them (the term :class:`~policies.cost_model.StepCostModel` prices with ``c_ctx``).
        prefill_tokens: prompt tokens prefilled in the step (requests that started in it).
    """

    num_tokens: np.ndarray
    draft_tokens: np.ndarray
    num_requests: np.ndarray
    kv_tokens: np.ndarray
    context_tokens: np.ndarray
    prefill_tokens: np.ndarray

    def __post_init__(self) -> None:
        length = None
        for field in fields(self):
            values = np.asarray(getattr(self, field.name), dtype=np.int64)
            if values.ndim != 1:
                raise ValueError(f"{field.name} must be one-dimensional, got {values.shape}")
            if values.size and values.min() < 0:
                raise ValueError(f"{field.name} holds {int(values.min())}, must be >= 0")
            if length is None:
                length = values.size
            elif values.size != length:
                raise ValueError(f"{field.name} has {values.size} steps, expected {length}")
            object.__setattr__(self, field.name, values)
        if np.any(self.draft_tokens > self.num_tokens):
            raise ValueError("draft_tokens must be <= num_tokens in every step")

    def __len__(self) -> int:
        return int(self.num_tokens.size)

    @classmethod
    def empty(cls) -> StepShapes:
        """No steps."""
        zero = np.zeros(0, dtype=np.int64)
        return cls(zero, zero, zero, zero, zero, zero)

    @classmethod
    def from_columns(
        cls,
        num_tokens: ArrayLike,
        draft_tokens: ArrayLike | None = None,
        num_requests: ArrayLike | None = None,
        kv_tokens: ArrayLike | None = None,
        context_tokens: ArrayLike | None = None,
        prefill_tokens: ArrayLike | None = None,
    ) -> StepShapes:
        """Shapes from columns; a column left out is all zeros (``num_requests``: ``num_tokens
        - draft_tokens``, one verified non-draft token per request)."""
        tokens = np.atleast_1d(np.asarray(num_tokens, dtype=np.int64))
        zeros = np.zeros_like(tokens)

        def column(values: ArrayLike | None, default: np.ndarray) -> np.ndarray:
            if values is None:
                return default
            return np.broadcast_to(np.asarray(values, dtype=np.int64), tokens.shape).copy()

        drafts = column(draft_tokens, zeros)
        return cls(
            num_tokens=tokens,
            draft_tokens=drafts,
            num_requests=column(num_requests, tokens - drafts),
            kv_tokens=column(kv_tokens, zeros),
            context_tokens=column(context_tokens, zeros),
            prefill_tokens=column(prefill_tokens, zeros),
        )

    def concatenate(self, other: StepShapes) -> StepShapes:
        """These steps followed by ``other``'s."""
        return StepShapes(
            *(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self))
        )
