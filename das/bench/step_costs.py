"""What a DAS engine's steps cost, with drafts and without, by batch size.

A live run (:mod:`das.bench.live`) keeps, per RL step, the engine steps the online cost fit
observed (``cost_observations``: tokens, KV tokens read, seconds, draft tokens). Binning them by
the number of requests in the step, and splitting each bin into steps that verified drafts and
steps that did not, shows where drafting cost more than it could save, without any fitted
model in between.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_BATCH_EDGES",
    "OBSERVATION_FIELDS",
    "StepCostBin",
    "bin_step_costs",
    "concatenate_observations",
    "format_step_costs",
]

# Bin edges over requests per engine step (lower bound inclusive).
DEFAULT_BATCH_EDGES = (1, 8, 16, 32, 64, 128, 200, 257)


@dataclass(frozen=True)
class StepCostBin:
    """Engine steps with ``low <= requests < high``, split by whether they verified drafts.

    Means are NaN for an empty side. ``context_per_request`` is the mean KV tokens read per
    processed token (the requests' mean context length)."""

    low: int
    high: int
    drafted_steps: int
    drafted_ms: float
    drafted_tokens_per_step: float
    drafted_context_per_token: float
    plain_steps: int
    plain_ms: float
    plain_context_per_token: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OBSERVATION_FIELDS = ("num_tokens", "context_tokens", "seconds", "draft_tokens")


def concatenate_observations(
    observations: Sequence[Mapping[str, Sequence[float]]],
) -> dict[str, np.ndarray]:
    """The engine steps of every RL step's ``observations``, one float64 array per field.

    Raises:
        ValueError: if a mapping lacks a field or its fields differ in length.
    """
    columns: dict[str, list[np.ndarray]] = {name: [] for name in OBSERVATION_FIELDS}
    for index, step in enumerate(observations):
        missing = [name for name in OBSERVATION_FIELDS if name not in step]
        if missing:
            raise ValueError(f"observations[{index}] lacks {missing}")
        sizes = {len(step[name]) for name in OBSERVATION_FIELDS}
        if len(sizes) != 1:
            raise ValueError(f"observations[{index}] has fields of different lengths {sizes}")
        for name in OBSERVATION_FIELDS:
            columns[name].append(np.asarray(step[name], dtype=np.float64))
    return {
        name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()
    }


def bin_step_costs(
    observations: Sequence[Mapping[str, Sequence[float]]],
    edges: Sequence[int] = DEFAULT_BATCH_EDGES,
) -> list[StepCostBin]:
    """Bin the engine steps of ``observations`` (one mapping per RL step, as in the JSON).

    Raises:
        ValueError: if a mapping lacks a field or its fields differ in length, or ``edges``
            is not increasing.
    """
    edges = [int(edge) for edge in edges]
    if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"edges={edges!r} must hold at least two increasing values")
    data = concatenate_observations(observations)
    tokens, drafts = data["num_tokens"], data["draft_tokens"]
    requests = tokens - drafts
    drafted = drafts > 0
    bins = []
    for low, high in itertools.pairwise(edges):
        in_bin = (requests >= low) & (requests < high)
        with_drafts, plain = in_bin & drafted, in_bin & ~drafted
        bins.append(
            StepCostBin(
                low=low,
                high=high,
                drafted_steps=int(with_drafts.sum()),
                drafted_ms=_mean(data["seconds"][with_drafts]) * 1000,
                drafted_tokens_per_step=_mean(drafts[with_drafts]),
                drafted_context_per_token=_ratio(data["context_tokens"], tokens, with_drafts),
                plain_steps=int(plain.sum()),
                plain_ms=_mean(data["seconds"][plain]) * 1000,
                plain_context_per_token=_ratio(data["context_tokens"], tokens, plain),
            )
        )
    return bins


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _ratio(numerator: np.ndarray, denominator: np.ndarray, mask: np.ndarray) -> float:
    return float(numerator[mask].sum() / denominator[mask].sum()) if mask.any() else float("nan")


def format_step_costs(bins: Sequence[StepCostBin]) -> str:
    """A fixed-width table of :func:`bin_step_costs`."""
    lines = [
        f"{'requests':>10} | {'drafted':>7} {'ms':>7} {'drafts':>7} {'ctx/tok':>7} "
        f"| {'plain':>7} {'ms':>7} {'ctx/tok':>7}"
    ]
    for row in bins:
        lines.append(
            f"{f'{row.low}-{row.high - 1}':>10} | {row.drafted_steps:>7} {row.drafted_ms:>7.1f} "
            f"{row.drafted_tokens_per_step:>7.1f} {row.drafted_context_per_token:>7.0f} "
            f"| {row.plain_steps:>7} {row.plain_ms:>7.1f} {row.plain_context_per_token:>7.0f}"
        )
    return "\n".join(lines)
