"""Can a live engine tell early which rollouts will end an RL step? Signals measured on a trace.

A step lasts as long as its slowest rollout, and on the RL workload those are the responses cut
at the token cap (``finish_reason == "length"``): they all run to the last iteration together.
Drafting shortens the step only if it speeds up every one of them, from early on, while the
batch is still large. So a makespan policy (:func:`policies.budget.makespan_budgets`) needs to
pick them out early. This module measures, on a recorded trace, the signals a live engine has:

* the prompt's history: the share of its earlier rollouts that were truncated
  (:func:`truncation_by_history`);
* the request's own repetition: its output repeats a ``window``-token span it produced before
  (:func:`first_repeat_position`, :func:`repetition_detector`);
* its age: it is still running after ``t`` tokens (:func:`truncation_given_alive`, with and
  without repetition so far).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rollouts.trace import RolloutRecord

__all__ = [
    "AliveRow",
    "DetectorScore",
    "HistoryBin",
    "first_repeat_position",
    "is_truncated",
    "repetition_detector",
    "truncation_by_history",
    "truncation_given_alive",
]

# Bins of a prompt's earlier truncated share (lower bound inclusive; the last bin includes 1).
DEFAULT_HISTORY_EDGES = (0.0, 1e-9, 0.125, 0.25, 0.5, 1.0)


def is_truncated(record: RolloutRecord) -> bool:
    """Whether the rollout was cut at the token cap rather than ending with a stop token."""
    return record.finish_reason == "length"


def first_repeat_position(tokens: Sequence[int] | np.ndarray, window: int) -> int | None:
    """The first output length ``t`` at which the last ``window`` tokens occurred before.

    That is the smallest ``t >= window`` such that ``tokens[t - window:t]`` equals some
    ``tokens[s - window:s]`` with ``s < t`` (spans may overlap): the point where a live engine,
    hashing every span it has seen, first sees the output repeat itself. ``None`` if it never
    does. O(len(tokens)) expected.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window={window!r} must be a positive integer")
    values = np.asarray(tokens).tolist()
    seen: set[tuple[int, ...]] = set()
    for end in range(window, len(values) + 1):
        span = tuple(values[end - window : end])
        if span in seen:
            return end
        seen.add(span)
    return None


@dataclass(frozen=True)
class HistoryBin:
    """Rollouts whose prompt's earlier rollouts had a truncated share in ``[low, high)``."""

    low: float
    high: float
    rollouts: int
    truncated_share: float  # NaN for an empty bin

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncation_by_history(
    records: Sequence[RolloutRecord], edges: Sequence[float] = DEFAULT_HISTORY_EDGES
) -> list[HistoryBin]:
    """Truncation rate of rollouts, binned by their prompt's truncated share in earlier steps.

    Only rollouts whose prompt has rollouts in an earlier step count (a live engine has no
    history for the first step). If the prompt's history predicted truncation, the rate would
    rise across the bins.
    """
    bounds = np.asarray(edges, dtype=np.float64)
    if bounds.ndim != 1 or bounds.size < 2 or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"edges={list(edges)!r} must be at least two increasing numbers")
    by_prompt: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_prompt[record.prompt_key][record.step].append(is_truncated(record))
    shares, outcomes = [], []
    for steps in by_prompt.values():
        for step, truncated in steps.items():
            earlier = [flag for other, flags in steps.items() if other < step for flag in flags]
            if earlier:
                shares += [float(np.mean(earlier))] * len(truncated)
                outcomes += truncated
    share = np.asarray(shares, dtype=np.float64)
    outcome = np.asarray(outcomes, dtype=np.float64)
    bins = []
    for index, (low, high) in enumerate(itertools.pairwise(bounds)):
        last = index == bounds.size - 2
        inside = (share >= low) & ((share <= high) if last else (share < high))
        bins.append(
            HistoryBin(
                low=float(low),
                high=float(high),
                rollouts=int(inside.sum()),
                truncated_share=float(outcome[inside].mean()) if inside.any() else float("nan"),
            )
        )
    return bins


@dataclass(frozen=True)
class DetectorScore:
    """How well "the output repeated a ``window``-token span" flags truncated rollouts."""

    window: int
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    precision: float
    recall: float
    # For the truncated rollouts it flagged: tokens generated after the flag (how early it was).
    median_tokens_after_flag: float
    p10_tokens_after_flag: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repetition_detector(records: Sequence[RolloutRecord], window: int) -> DetectorScore:
    """Score the repetition flag (:func:`first_repeat_position`) as a truncation predictor."""
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    lead = []
    for record in records:
        flagged_at = first_repeat_position(record.response_tokens, window)
        truncated = is_truncated(record)
        if flagged_at is not None and truncated:
            counts["tp"] += 1
            lead.append(record.num_response_tokens - flagged_at)
        elif flagged_at is not None:
            counts["fp"] += 1
        elif truncated:
            counts["fn"] += 1
        else:
            counts["tn"] += 1
    flagged = counts["tp"] + counts["fp"]
    positives = counts["tp"] + counts["fn"]
    return DetectorScore(
        window=window,
        true_positives=counts["tp"],
        false_positives=counts["fp"],
        false_negatives=counts["fn"],
        true_negatives=counts["tn"],
        precision=counts["tp"] / flagged if flagged else float("nan"),
        recall=counts["tp"] / positives if positives else float("nan"),
        median_tokens_after_flag=float(np.median(lead)) if lead else float("nan"),
        p10_tokens_after_flag=float(np.percentile(lead, 10)) if lead else float("nan"),
    )


@dataclass(frozen=True)
class AliveRow:
    """Rollouts still running after ``age`` tokens, and how many of them end truncated."""

    age: int
    alive: int
    truncated_share: float
    repeated: int  # of the alive, those whose output had repeated a window by ``age``
    repeated_truncated_share: float
    not_repeated: int
    not_repeated_truncated_share: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _share(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def truncation_given_alive(
    records: Sequence[RolloutRecord], ages: Sequence[int], window: int
) -> list[AliveRow]:
    """Per age ``t``: of the rollouts still generating after ``t`` tokens, the truncated share,
    split by whether their output had repeated a ``window``-token span by then."""
    flags = [
        (
            record.num_response_tokens,
            first_repeat_position(record.response_tokens, window),
            is_truncated(record),
        )
        for record in records
    ]
    rows = []
    for age in ages:
        if isinstance(age, bool) or not isinstance(age, (int, np.integer)) or age < 0:
            raise ValueError(f"age={age!r} must be a non-negative integer")
        alive = [(at, truncated) for length, at, truncated in flags if length > age]
        repeated = [truncated for at, truncated in alive if at is not None and at <= age]
        fresh = [truncated for at, truncated in alive if at is None or at > age]
        rows.append(
            AliveRow(
                age=int(age),
                alive=len(alive),
                truncated_share=_share([truncated for _, truncated in alive]),
                repeated=len(repeated),
                repeated_truncated_share=_share(repeated),
                not_repeated=len(fresh),
                not_repeated_truncated_share=_share(fresh),
            )
        )
    return rows
