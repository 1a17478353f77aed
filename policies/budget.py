"""Draft budgets: how many draft tokens each running request may verify in the next step.

Three policies, all pure functions of plain numbers:

* fixed: every request gets ``k`` (:func:`fixed_budgets`, :class:`FixedPolicy`);
* length classes, as in the DAS authors' code: prompts ranked by historical mean length, top
  20% long, next 40% medium, rest short, budgets 4/2/0, a request that has generated more than
  a threshold promoted to long (:class:`LengthClassPolicy`, :class:`LengthClassBudgetPolicy`);
* cost-model optimal: the budgets that maximise expected tokens produced per second of step
  time under a :class:`~policies.cost_model.StepCostModel` (:func:`optimal_budgets`,
  :class:`CostModelPolicy`).

A budget is an upper bound: the drafter proposes at most that many tokens.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import TypeVar

import numpy as np

from policies._checks import as_float_vector, check_int, check_real
from policies.cost_model import COST_FIELDS, OnlineCostFitter, StepCostModel

__all__ = [
    "BudgetPolicy",
    "CostModelPolicy",
    "FixedPolicy",
    "LengthClass",
    "LengthClassBudgetPolicy",
    "LengthClassPolicy",
    "RequestView",
    "binding_shares",
    "drafting_can_pay",
    "expected_produced_tokens",
    "fixed_budgets",
    "makespan_budgets",
    "optimal_budgets",
    "predicted_remaining_tokens",
    "remaining_length_weights",
]

KeyT = TypeVar("KeyT", bound=Hashable)


class LengthClass(str, Enum):
    """Length class of a prompt, from the historical lengths of its rollouts."""

    LONG = "long"
    MEDIUM = "medium"
    SHORT = "short"


def _as_length_class(value: LengthClass | str, name: str) -> LengthClass:
    try:
        return LengthClass(value)
    except ValueError as error:
        choices = [member.value for member in LengthClass]
        raise ValueError(f"{name}={value!r} must be one of {choices}") from error


def fixed_budgets(num_requests: int, k: int) -> np.ndarray:
    """Budget ``k`` for each of ``num_requests`` requests, as an int64 array."""
    num_requests = check_int(num_requests, "num_requests", minimum=0)
    k = check_int(k, "k", minimum=0)
    return np.full(num_requests, k, dtype=np.int64)


# --------------------------------------------------------------------------- length classes


@dataclass(frozen=True, slots=True)
class LengthClassPolicy:
    """Budgets by length class (the DAS authors' bucket policy).

    Attributes:
        long_fraction: share of prompts, longest first, classed long.
        medium_fraction: share of prompts after those classed medium; the rest are short.
        budgets: draft budgets of (long, medium, short) requests.
        promote_after_tokens: a request that has generated at least this many tokens gets the
            long budget whatever its class (``None``: never promote).
        unknown_class: class of prompts without history.
    """

    long_fraction: float = 0.2
    medium_fraction: float = 0.4
    budgets: tuple[int, int, int] = (4, 2, 0)
    promote_after_tokens: int | None = 256
    unknown_class: LengthClass = LengthClass.MEDIUM

    def __post_init__(self) -> None:
        long_fraction = check_real(self.long_fraction, "long_fraction", minimum=0.0)
        medium_fraction = check_real(self.medium_fraction, "medium_fraction", minimum=0.0)
        if long_fraction + medium_fraction > 1.0 + 1e-12:
            raise ValueError(
                f"long_fraction={long_fraction!r} + medium_fraction={medium_fraction!r} "
                "must be <= 1"
            )
        shape_error = f"budgets={self.budgets!r} must be three integers (long, medium, short)"
        if isinstance(self.budgets, (str, bytes)) or not isinstance(self.budgets, Iterable):
            raise ValueError(shape_error)
        budgets = tuple(self.budgets)
        if len(budgets) != 3:
            raise ValueError(shape_error)
        budgets = tuple(check_int(value, "budgets", minimum=0) for value in budgets)
        if self.promote_after_tokens is not None:
            check_int(self.promote_after_tokens, "promote_after_tokens", minimum=0)
        object.__setattr__(self, "long_fraction", long_fraction)
        object.__setattr__(self, "medium_fraction", medium_fraction)
        object.__setattr__(self, "budgets", budgets)
        unknown_class = _as_length_class(self.unknown_class, "unknown_class")
        object.__setattr__(self, "unknown_class", unknown_class)

    def classify(
        self, historical_lengths: Mapping[KeyT, float], keys: Iterable[KeyT] | None = None
    ) -> dict[KeyT, LengthClass]:
        """Class of each prompt, ranked by historical mean rollout length.

        With ``n`` prompts, the ``round(long_fraction * n)`` longest are long and the next
        ``round(medium_fraction * n)`` medium (halves round up). Equal lengths share the class
        of the best rank among them, so ties at a boundary all go to the longer class.

        Args:
            historical_lengths: mean rollout length per prompt key, for the prompts with history.
            keys: prompts to classify; default: those of ``historical_lengths``. Keys without
                history get ``unknown_class``.
        """
        values = np.array([float(v) for v in historical_lengths.values()], dtype=np.float64)
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
            bad = next(
                key
                for key, value in historical_lengths.items()
                if not (math.isfinite(float(value)) and float(value) >= 0)
            )
            raise ValueError(
                f"historical_lengths[{bad!r}]={historical_lengths[bad]!r} must be finite and >= 0"
            )
        num_prompts = values.size
        num_long = math.floor(self.long_fraction * num_prompts + 0.5)
        num_upper = math.floor((self.long_fraction + self.medium_fraction) * num_prompts + 0.5)
        ascending = np.sort(values)
        # rank = how many prompts are strictly longer
        ranks = num_prompts - np.searchsorted(ascending, values, side="right")
        known: dict[KeyT, LengthClass] = {}
        for key, rank in zip(historical_lengths.keys(), ranks.tolist(), strict=True):
            if rank < num_long:
                known[key] = LengthClass.LONG
            elif rank < num_upper:
                known[key] = LengthClass.MEDIUM
            else:
                known[key] = LengthClass.SHORT
        if keys is None:
            return known
        return {key: known.get(key, self.unknown_class) for key in keys}

    def budget(self, length_class: LengthClass | str, generated_tokens: int) -> int:
        """Budget of a request of ``length_class`` that has generated ``generated_tokens``."""
        length_class = _as_length_class(length_class, "length_class")
        generated_tokens = check_int(generated_tokens, "generated_tokens", minimum=0)
        if self.promote_after_tokens is not None and generated_tokens >= self.promote_after_tokens:
            length_class = LengthClass.LONG
        index = (LengthClass.LONG, LengthClass.MEDIUM, LengthClass.SHORT).index(length_class)
        return self.budgets[index]

    def batch_budget(
        self, length_classes: Sequence[LengthClass], generated_tokens: np.ndarray
    ) -> np.ndarray:
        """:meth:`budget` for many requests at once."""
        order = (LengthClass.LONG, LengthClass.MEDIUM, LengthClass.SHORT)
        by_class = dict(zip(order, self.budgets, strict=True))
        budgets = np.array([by_class[c] for c in length_classes], dtype=np.int64)
        if self.promote_after_tokens is not None:
            promoted = np.asarray(generated_tokens) >= self.promote_after_tokens
            budgets[promoted] = self.budgets[0]
        return budgets


# --------------------------------------------------------------------------- cost-model optimum


def _flatten_probs(
    cumulative_probs: Sequence[np.ndarray], max_budget: int | None
) -> tuple[Sequence[np.ndarray], np.ndarray, np.ndarray]:
    """(per-request arrays, their probabilities cut to ``max_budget`` end to end, offsets):
    request i's are ``probs[offsets[i]:offsets[i + 1]]``. Not yet checked."""
    if isinstance(cumulative_probs, np.ndarray) and cumulative_probs.ndim == 2:
        # A [requests, K] matrix (zeros past each draft): one reshape, no per-row arrays.
        matrix = np.asarray(cumulative_probs, dtype=np.float64)
        if max_budget is not None:
            matrix = matrix[:, :max_budget]
        offsets = np.arange(matrix.shape[0] + 1, dtype=np.int64) * matrix.shape[1]
        return matrix, np.ascontiguousarray(matrix).reshape(-1), offsets
    arrays = [np.asarray(probs, dtype=np.float64) for probs in cumulative_probs]
    for index, array in enumerate(arrays):
        if array.ndim != 1:
            raise ValueError(f"cumulative_probs[{index}] must be one-dimensional")
    if max_budget is not None:
        arrays = [array[:max_budget] for array in arrays]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([array.size for array in arrays], out=offsets[1:])
    return arrays, (np.concatenate(arrays) if arrays else np.zeros(0)), offsets


def _raise_for_status(
    status: int, index: int, arrays: Sequence[np.ndarray], cost: StepCostModel
) -> None:
    """Raise the error a budget kernel's status code names (nothing for ``OK``)."""
    kernels = _kernels()
    if status == kernels.OUT_OF_RANGE:
        raise ValueError(f"cumulative_probs[{index}]={arrays[index]!r} must lie in [0, 1]")
    if status == kernels.RISING:
        raise ValueError(f"cumulative_probs[{index}]={arrays[index]!r} must be non-increasing")
    if status == kernels.NON_POSITIVE_TIME:
        raise ValueError(f"cost={cost!r} predicts a step time <= 0")


def _flatten_gains(
    cumulative_probs: Sequence[np.ndarray],
    weights: np.ndarray,
    max_budget: int | None,
    cost: StepCostModel,
) -> tuple[np.ndarray, np.ndarray]:
    """(gains, request index) of every draft token a budget could include, request-major,
    the probabilities checked."""
    arrays, probs, offsets = _flatten_probs(cumulative_probs, max_budget)
    status, index = _kernels().check_cumulative_probs(probs, offsets)
    _raise_for_status(status, index, arrays, cost)
    request = np.repeat(np.arange(offsets.size - 1, dtype=np.int64), np.diff(offsets))
    return probs * weights[request], request


_NO_VALUES = np.zeros(0)  # an empty array: "no per-request values" to the kernels


def _kernels() -> ModuleType:
    """The compiled budget kernels, imported on first use (importing them loads numba)."""
    from policies import _budget_kernels

    return _budget_kernels


_warmed_up = False


def _warm_up_kernels() -> None:
    """Compile (or load from numba's cache) the budget kernels, once per process, with the
    argument types a drafter passes them."""
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    cost = StepCostModel(c_base=0.01, c_tok=0.001)
    probs = np.array([[0.9, 0.5], [0.4, 0.0]])
    for context in (np.array([10, 20]), 15.0):
        optimal_budgets(probs, cost, context_tokens=context, max_budget=2)
        optimal_budgets(probs, cost, context_tokens=context, weights=np.ones(2))
        drafting_can_pay(np.array([2, 1]), cost, context_tokens=context)
        drafting_can_pay(np.array([2, 1]), cost, context_tokens=context, weights=np.ones(2))


def _kernel_context(context_tokens: float | np.ndarray, num_requests: int) -> tuple:
    """``context_tokens`` checked and as the budget kernels take it: (each request's context,
    or an empty array for a scalar; the scalar, every step's reads whatever its drafts, or 0;
    the reads of a step without drafts, each request's cache read once)."""
    if np.ndim(context_tokens) > 0:
        context = _per_request(context_tokens, "context_tokens", num_requests)
        return context, 0.0, float(context.sum())
    scalar = check_real(context_tokens, "context_tokens", minimum=0.0)
    return _NO_VALUES, scalar, scalar


def _coefficients(cost: StepCostModel) -> np.ndarray:
    """``cost``'s fields in the order the budget kernels index them."""
    return np.array([getattr(cost, name) for name in COST_FIELDS], dtype=np.float64)


def _per_request(values: object, name: str, num_requests: int) -> np.ndarray:
    """``values`` as a float vector >= 0 with one value per request (a clear error if not)."""
    array = as_float_vector(values, name, minimum=0.0)
    if array.size != num_requests:
        raise ValueError(f"{name} has {array.size} values for {num_requests} requests")
    return array


def _check_weights(weights: np.ndarray | None, num_requests: int) -> np.ndarray:
    if weights is None:
        return np.ones(num_requests)
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (num_requests,):
        raise ValueError(f"weights has shape {array.shape}, expected ({num_requests},)")
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= 0.0):
        raise ValueError(f"weights={array!r} must be finite and >= 0")
    return array


def expected_produced_tokens(
    budgets: Sequence[int] | np.ndarray,
    cumulative_probs: Sequence[np.ndarray],
    weights: np.ndarray | None = None,
) -> float:
    """Weighted expected tokens one step produces: ``sum_i w_i * (1 + sum_{k<=b_i} P_i[k-1])``.

    ``P_i[k-1]`` is the probability that the first ``k`` draft tokens of request ``i`` are all
    accepted; each request also produces its bonus (or corrected) token.
    """
    weight = _check_weights(weights, len(cumulative_probs))
    total = 0.0
    for index, (budget, probs) in enumerate(zip(budgets, cumulative_probs, strict=True)):
        total += weight[index] * (1.0 + float(np.sum(np.asarray(probs, np.float64)[: int(budget)])))
    return total


def optimal_budgets(
    cumulative_probs: Sequence[np.ndarray],
    cost: StepCostModel,
    context_tokens: float | np.ndarray = 0,
    weights: np.ndarray | None = None,
    max_budget: int | None = None,
    min_relative_gain: float = 0.0,
) -> np.ndarray:
    """Budgets that maximise expected produced tokens per second of step time.

    Request ``i`` has a draft whose first ``k`` tokens are all accepted with probability
    ``cumulative_probs[i][k-1]`` (non-increasing in ``k``). Budgets ``k_i`` make the step
    process ``sum_i (1 + k_i)`` tokens and produce in expectation
    ``sum_i w_i * (1 + sum_{k <= k_i} cumulative_probs[i][k-1])`` (weighted) tokens; the result
    maximises that divided by ``cost.step_time(sum_i (1 + k_i), reads, sum_i k_i)``.

    The weight multiplies the bonus token too, so scaling all weights changes nothing; with the
    default weights of 1 this is plain expected tokens per second.

    Exact: for a fixed total ``m`` of draft tokens the step time is fixed, and because each
    request's marginal gains ``w_i * cumulative_probs[i][k-1]`` are non-increasing, the best
    choice is the ``m`` largest gains overall (they form a prefix of every request's draft).
    All ``m`` are evaluated with one sort and a prefix sum; ties go to the smaller ``m``.
    Cost: O(N log N) for N candidate draft tokens.

    Args:
        cumulative_probs: per request, the cumulative acceptance probabilities of its draft
            (its length bounds the budget).
        cost: the step cost model.
        context_tokens: each request's context length (prompt + generated tokens), an array;
            every token a step verifies attends to its request's context, so the step reads
            ``sum_i (1 + k_i) * context_i`` KV tokens, which is what ``cost`` is given. A scalar
            is taken as the step's KV tokens whatever the budgets.
        weights: per-request weights >= 0 (default 1), e.g. to favour long requests.
        max_budget: cap on every budget (default: the draft lengths).
        min_relative_gain: draft only if the best rate beats not drafting by this fraction; a
            margin against errors in the probabilities (drafting that is predicted to gain
            less than the estimates can be trusted is skipped).

    Returns:
        int64 budgets, one per request.

    Raises:
        ValueError: on probabilities outside [0, 1] or increasing, bad weights or budgets, or
            a cost model that predicts a step time <= 0.
    """
    num_requests = len(cumulative_probs)
    if max_budget is not None:
        max_budget = check_int(max_budget, "max_budget", minimum=0)
    context, context_scalar, reads = _kernel_context(context_tokens, num_requests)
    weight = _check_weights(weights, num_requests)
    if num_requests == 0:
        return np.zeros(0, dtype=np.int64)
    arrays, probs, offsets = _flatten_probs(cumulative_probs, max_budget)
    budgets = np.zeros(num_requests, dtype=np.int64)
    status, index = _kernels().optimal_draft_counts(
        probs,
        offsets,
        weight,
        float(weight.sum()),
        context,
        context_scalar,
        reads,
        _coefficients(cost),
        float(min_relative_gain),
        budgets,
    )
    _raise_for_status(status, index, arrays, cost)
    return budgets


def drafting_can_pay(
    caps: np.ndarray,
    cost: StepCostModel,
    context_tokens: float | np.ndarray = 0,
    weights: np.ndarray | None = None,
    min_relative_gain: float = 0.0,
    lookup_s: float = 0.0,
) -> bool:
    """Whether :func:`optimal_budgets` could give any request a budget, whatever its drafts.

    An upper bound from the step's shape alone: every draft token accepted, and the ``m``
    drafted tokens the most valuable (largest weights) and the cheapest (smallest contexts)
    that ``caps`` allow. Expected tokens can only be lower and the step time only higher for
    any real drafts of at most ``caps[i]`` tokens for request ``i``, so when even this bound
    does not beat not drafting by ``min_relative_gain``, :func:`optimal_budgets` returns zeros
    for any acceptance probabilities, and a drafter need not look drafts up. Rounding errs
    toward True. Other arguments as in :func:`optimal_budgets`.

    ``lookup_s`` is the drafter's own time to look this batch's drafts up. A speculative engine
    drafts between one step's sampling and the next step's launch, so that time is in series
    with the step: it is added to the time of every choice that drafts, and drafting must pay
    for it too (the bound then no longer implies zeros from :func:`optimal_budgets`, which
    decides after the lookup, when its time is spent).
    """
    lookup = check_real(lookup_s, "lookup_s", minimum=0.0)
    counts = np.maximum(np.asarray(caps, dtype=np.int64), 0)
    num_requests = counts.size
    if num_requests == 0 or counts.max() == 0:
        return False
    weight = _check_weights(weights, num_requests)
    context, context_scalar, reads = _kernel_context(context_tokens, num_requests)
    return bool(
        _kernels().drafting_bound_pays(
            counts,
            _NO_VALUES if weights is None else weight,
            float(weight.sum()),
            context,
            context_scalar,
            reads,
            _coefficients(cost),
            float(min_relative_gain),
            lookup,
        )
    )


def binding_shares(remaining: np.ndarray, tolerance: float = 16.0) -> np.ndarray:
    """Per request, its predicted share of the step's binding (last-to-finish) requests.

    The requests predicted to need at least ``max(remaining) - tolerance`` more tokens share
    1 equally; the rest get 0. The shares sum to 1 (for a non-empty batch).
    """
    values = np.asarray(remaining, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0)
    binding = values >= values.max() - check_real(tolerance, "tolerance", minimum=0.0)
    return binding / binding.sum()


def makespan_budgets(
    cumulative_probs: Sequence[np.ndarray],
    cost: StepCostModel,
    remaining_tokens: np.ndarray,
    context_tokens: np.ndarray | None = None,
    max_budget: int | None = None,
    min_relative_gain: float = 0.0,
    tolerance: float = 16.0,
) -> np.ndarray:
    """Budgets that minimise the expected remaining time of an RL step (its makespan).

    All of a step's requests start together and the step lasts until the last one finishes, so
    a step's fixed cost ``c_base`` is paid once per iteration of its *longest* request. An
    accepted draft token of request ``i`` saves one of its iterations, which shortens the step
    by ``c_base`` if ``i`` is the binding request (probability :func:`binding_shares`, from the
    predicted ``remaining_tokens``). It also saves the token's processing in a later step,
    priced at one more token in a plain step now. A draft token costs what it adds to this
    step's time, accepted or not. The result maximises expected saving minus added time over
    the total number of draft tokens; as in :func:`optimal_budgets`, for a fixed total the
    largest net gains form a prefix of every draft, so one sort is exact.

    The throughput objective (:func:`optimal_budgets`) spreads ``c_base`` over all running
    requests; this one gives it to those predicted to finish last, so it needs predictions
    that single them out: with true remaining lengths (a replay can know them) it cuts
    iterations where the throughput objective cannot (``scripts/bench_policy_ceiling.py``).

    Args:
        cumulative_probs: per request, cumulative acceptance probabilities of its draft.
        cost: the step cost model.
        remaining_tokens: per request, predicted tokens still to generate.
        context_tokens: per request context length (KV tokens each verified token reads).
        max_budget: cap on every budget.
        min_relative_gain: draft only if the expected saving beats the added time by this
            fraction of a plain step's time.
        tolerance: see :func:`binding_shares`.

    Returns:
        int64 budgets, one per request.
    """
    num_requests = len(cumulative_probs)
    if max_budget is not None:
        max_budget = check_int(max_budget, "max_budget", minimum=0)
    remaining = _per_request(remaining_tokens, "remaining_tokens", num_requests)
    if context_tokens is None:
        context = np.zeros(num_requests)
    else:
        context = _per_request(context_tokens, "context_tokens", num_requests)
    if num_requests == 0:
        return np.zeros(0, dtype=np.int64)
    reads = float(context.sum())
    plain = float(cost.step_times(num_requests, reads, kv_tokens=reads))
    if plain <= 0.0:
        raise ValueError(f"cost={cost!r} predicts a step time <= 0")
    # A token generated later costs one more token in a plain step of this batch.
    later = cost.step_times(num_requests + 1, reads + context, kv_tokens=reads) - plain
    fixed = cost.c_base + cost.c_kv * reads  # paid by every step, whatever it verifies
    value = fixed * binding_shares(remaining, tolerance) + later
    gains, request = _flatten_gains(cumulative_probs, value, max_budget, cost)
    # A draft token's attention reads are its own request's cost; the rest of what it adds
    # depends only on how many drafts the step holds. Net of the former, gains still fall
    # along every draft, so the best m tokens are the m largest net gains.
    net_gains = gains - cost.c_ctx * context[request]
    order = np.argsort(-net_gains, kind="stable")
    num_drafts = np.arange(gains.size + 1)
    added = cost.step_times(num_requests + num_drafts, reads, num_drafts, kv_tokens=reads) - plain
    net = np.concatenate([[0.0], np.cumsum(net_gains[order])]) - added
    num_drafted = int(np.argmax(net))  # first maximum: ties go to fewer drafts
    if net[num_drafted] <= min_relative_gain * plain:
        num_drafted = 0
    return np.bincount(request[order[:num_drafted]], minlength=num_requests).astype(np.int64)


def predicted_remaining_tokens(
    generated_tokens: np.ndarray, expected_lengths: np.ndarray
) -> np.ndarray:
    """Predicted tokens each request still generates: ``max(expected - generated, generated, 1)``.

    The first term is what the prompt's history predicts; once a request has outlived half of
    it, its own age takes over (the mean residual life of a long-tailed length grows with age,
    so a request past its prompt's mean is probably in the tail). Unknown expected lengths (NaN)
    take the batch mean of the known ones (0 if none is known).
    """
    generated = np.asarray(generated_tokens, dtype=np.float64)
    expected = np.array(expected_lengths, dtype=np.float64)
    if generated.shape != expected.shape or generated.ndim != 1:
        raise ValueError(
            f"generated_tokens {generated.shape} and expected_lengths {expected.shape} "
            "must be one-dimensional of the same length"
        )
    known = np.isfinite(expected)
    if generated.size:
        expected[~known] = expected[known].mean() if known.any() else 0.0
    return np.maximum(np.maximum(expected - generated, generated), 1.0)


def remaining_length_weights(
    generated_tokens: np.ndarray,
    expected_lengths: np.ndarray,
    max_ratio: float = 4.0,
) -> np.ndarray:
    """Per-request weights from predicted remaining length, relative to the batch mean.

    The request predicted to finish last sets the step's makespan, so its tokens are worth
    more. Predicted remaining tokens: :func:`predicted_remaining_tokens`. Weights are the
    predictions divided by their mean, clipped to ``[1 / max_ratio, max_ratio]``.
    """
    max_ratio = check_real(max_ratio, "max_ratio", minimum=1.0)
    remaining = predicted_remaining_tokens(generated_tokens, expected_lengths)
    if remaining.size == 0:
        return np.zeros(0)
    return np.clip(remaining / remaining.mean(), 1.0 / max_ratio, max_ratio)


# --------------------------------------------------------------------------- per-step policies


@dataclass(frozen=True, eq=False, slots=True)
class RequestView:
    """What a budget policy sees of one running request in one step.

    Attributes:
        prompt_key: key of the request's prompt (history is grouped by it).
        generated_tokens: tokens the request has generated so far.
        cumulative_probs: cumulative acceptance probabilities of its current best draft
            (``Draft.cumulative_probs``); empty when there is no draft.
        length_class: class of its prompt.
        expected_length: historical mean rollout length of its prompt, if known.
        context_tokens: its current context length (prompt + generated), the KV tokens its
            attention reads.
    """

    prompt_key: Hashable
    generated_tokens: int
    cumulative_probs: np.ndarray
    length_class: LengthClass = LengthClass.MEDIUM
    expected_length: float | None = None
    context_tokens: int = 0

    def __post_init__(self) -> None:
        check_int(self.generated_tokens, "generated_tokens", minimum=0)
        check_int(self.context_tokens, "context_tokens", minimum=0)
        if self.expected_length is not None:
            check_real(self.expected_length, "expected_length", minimum=0.0)
        length_class = _as_length_class(self.length_class, "length_class")
        object.__setattr__(self, "length_class", length_class)
        object.__setattr__(
            self, "cumulative_probs", np.asarray(self.cumulative_probs, dtype=np.float64)
        )


@dataclass(frozen=True, slots=True)
class BatchView:
    """The same as a list of :class:`RequestView`, as arrays (row i = request i).

    What an engine passes every decode iteration: no object per request.
    """

    generated_tokens: np.ndarray  # int64 [rows]
    cumulative_probs: np.ndarray  # float64 [rows, K], 0 past each row's draft
    length_classes: Sequence[LengthClass]
    expected_lengths: np.ndarray  # float64 [rows], NaN when unknown
    context_tokens: np.ndarray  # int64 [rows]

    @staticmethod
    def from_requests(step_requests: Sequence[RequestView]) -> BatchView:
        rows = len(step_requests)
        width = max((view.cumulative_probs.size for view in step_requests), default=0)
        cumulative = np.zeros((rows, width))
        for row, view in enumerate(step_requests):
            cumulative[row, : view.cumulative_probs.size] = view.cumulative_probs
        return BatchView(
            generated_tokens=np.array([v.generated_tokens for v in step_requests], np.int64),
            cumulative_probs=cumulative,
            length_classes=[view.length_class for view in step_requests],
            expected_lengths=np.array(
                [np.nan if v.expected_length is None else v.expected_length for v in step_requests],
                np.float64,
            ),
            context_tokens=np.array([v.context_tokens for v in step_requests], np.int64),
        )

    def __len__(self) -> int:
        return int(self.generated_tokens.shape[0])


class BudgetPolicy(ABC):
    """Draft budgets for the requests of one step; called by the drafter once per step."""

    def budgets(
        self, step_requests: Sequence[RequestView], cost: StepCostModel | None = None
    ) -> np.ndarray:
        """int64 budget per request (an upper bound on its draft length).

        ``cost`` is the current step cost model; policies that do not use one ignore it.
        """
        return self.batch_budgets(BatchView.from_requests(step_requests), cost)

    @abstractmethod
    def batch_budgets(self, batch: BatchView, cost: StepCostModel | None = None) -> np.ndarray:
        """:meth:`budgets` for a whole batch given as arrays."""

    def may_draft(
        self, batch: BatchView, caps: np.ndarray, cost: StepCostModel | None = None
    ) -> bool:
        """False only if :meth:`batch_budgets` would give every request 0 whatever the drafts of
        at most ``caps`` tokens were (``batch.cumulative_probs`` is not read), so a drafter may
        skip looking them up. The default: True."""
        return True


@dataclass(frozen=True, slots=True)
class FixedPolicy(BudgetPolicy):
    """Every request gets budget ``k``."""

    k: int

    def __post_init__(self) -> None:
        check_int(self.k, "k", minimum=0)

    def batch_budgets(self, batch: BatchView, cost: StepCostModel | None = None) -> np.ndarray:
        return fixed_budgets(len(batch), self.k)


@dataclass(frozen=True, slots=True)
class LengthClassBudgetPolicy(BudgetPolicy):
    """Budgets from each request's length class and generated length (ignores the cost)."""

    policy: LengthClassPolicy = LengthClassPolicy()

    def __post_init__(self) -> None:
        if not isinstance(self.policy, LengthClassPolicy):
            raise ValueError(f"policy={self.policy!r} must be a LengthClassPolicy")

    def batch_budgets(self, batch: BatchView, cost: StepCostModel | None = None) -> np.ndarray:
        return self.policy.batch_budget(batch.length_classes, batch.generated_tokens)


@dataclass(frozen=True, slots=True)
class CostModelPolicy(BudgetPolicy):
    """The cost-model optimum (:func:`optimal_budgets`) for each step.

    Attributes:
        cost_source: a fixed :class:`StepCostModel` or an :class:`OnlineCostFitter` whose
            current model is read every step. A ``cost`` passed to :meth:`budgets` overrides it.
        max_budget: cap on every budget (``None``: the draft lengths).
        weight_by_length: weigh requests by :func:`remaining_length_weights`, so that drafts
            go first to the requests predicted to run longest.
        max_weight_ratio: clip of those weights around the batch mean.
        min_relative_gain: see :func:`optimal_budgets` (a margin against estimation error).
        lookup_s_per_request: the drafter's own time per request to look a batch's drafts up;
            a batch is looked up only if its drafts could pay for that time too (see
            :func:`drafting_can_pay`). 0: lookups are free.
    """

    cost_source: StepCostModel | OnlineCostFitter
    max_budget: int | None = None
    weight_by_length: bool = False
    max_weight_ratio: float = 4.0
    min_relative_gain: float = 0.0
    lookup_s_per_request: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.cost_source, (StepCostModel, OnlineCostFitter)):
            raise ValueError(
                f"cost_source={self.cost_source!r} must be a StepCostModel or OnlineCostFitter"
            )
        if self.max_budget is not None:
            check_int(self.max_budget, "max_budget", minimum=0)
        check_real(self.max_weight_ratio, "max_weight_ratio", minimum=1.0)
        check_real(self.min_relative_gain, "min_relative_gain", minimum=0.0)
        check_real(self.lookup_s_per_request, "lookup_s_per_request", minimum=0.0)
        _warm_up_kernels()  # the first engine step, and the lookups it times, pay no compile

    @property
    def cost_model(self) -> StepCostModel:
        """The model the next step uses, unless one is passed to :meth:`budgets`."""
        if isinstance(self.cost_source, OnlineCostFitter):
            return self.cost_source.model
        return self.cost_source

    def _weights(self, batch: BatchView) -> np.ndarray | None:
        if not (self.weight_by_length and len(batch)):
            return None
        return remaining_length_weights(
            batch.generated_tokens.astype(np.float64),
            batch.expected_lengths,
            max_ratio=self.max_weight_ratio,
        )

    def may_draft(
        self, batch: BatchView, caps: np.ndarray, cost: StepCostModel | None = None
    ) -> bool:
        caps = np.asarray(caps, dtype=np.int64)
        if self.max_budget is not None:
            caps = np.minimum(caps, self.max_budget)
        return drafting_can_pay(
            caps,
            cost if cost is not None else self.cost_model,
            context_tokens=batch.context_tokens,
            weights=self._weights(batch),
            min_relative_gain=self.min_relative_gain,
            lookup_s=self.lookup_s_per_request * len(batch),
        )

    def batch_budgets(self, batch: BatchView, cost: StepCostModel | None = None) -> np.ndarray:
        cost = cost if cost is not None else self.cost_model
        weights = self._weights(batch)
        return optimal_budgets(
            batch.cumulative_probs,
            cost,
            context_tokens=batch.context_tokens,
            weights=weights,
            max_budget=self.max_budget,
            min_relative_gain=self.min_relative_gain,
        )
