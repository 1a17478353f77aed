"""numba kernels of the cost-model budget policy (:mod:`policies.budget`): plain arrays and
numbers in, arrays and numbers out.

They compute exactly what the array code of :func:`policies.budget.optimal_budgets` and
:func:`policies.budget.drafting_can_pay` computed before them, bit for bit: every sum is
taken in the same order (prefix sums run left to right, as ``np.cumsum`` does), the step time
adds :meth:`policies.cost_model.StepCostModel.step_times`'s terms in its order and leaves out
the same zero-coefficient terms, and a stable sort orders the draft tokens. Sums whose order
numpy chooses itself (``weights.sum()``, ``context.sum()``) are taken by the caller and
passed in. The drafter calls them at every engine step, where the array code spent most of
its time in numpy's per-call overhead.

This module imports numba; :mod:`policies.budget` imports it only when a policy first runs, so
that importing the policies (as the CLI does) does not load numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Indices of the coefficients array: StepCostModel's fields in the order of
# policies.cost_model.COST_FIELDS.
C_BASE = 0
C_TOK = 1
KNEE_TOKENS = 2
C_CTX = 3
C_DRAFT = 4
C_SPEC_REQUEST = 5
C_PREFILL = 6
C_KV = 7
NUM_COEFFICIENTS = 8

# Status codes of optimal_draft_counts (the caller raises, naming the request).
OK = 0
OUT_OF_RANGE = 1
RISING = 2
NON_POSITIVE_TIME = 3


@njit(cache=True)
def _step_time(coefficients, num_tokens, attended, num_drafts, kv_tokens):
    """One step's seconds, as ``StepCostModel.step_times`` adds them up. A decode step has no
    prefill: its term would add an exact 0 to a positive sum, so it is left out."""
    total = coefficients[C_BASE] + coefficients[C_TOK] * max(
        0.0, num_tokens - coefficients[KNEE_TOKENS]
    )
    if coefficients[C_CTX] != 0.0:
        total = total + coefficients[C_CTX] * attended
    if coefficients[C_DRAFT] != 0.0:
        total = total + coefficients[C_DRAFT] * num_drafts
    if coefficients[C_SPEC_REQUEST] != 0.0:
        spec_requests = num_tokens - num_drafts if num_drafts > 0.0 else 0.0
        total = total + coefficients[C_SPEC_REQUEST] * spec_requests
    if coefficients[C_KV] != 0.0:
        total = total + coefficients[C_KV] * kv_tokens
    return total


@njit(cache=True)
def _stable_order(keys):
    """``np.argsort(keys, kind="stable")`` for keys that are not NaN: a least-significant-digit
    radix sort, byte by byte, of the keys' bits mapped to unsigned integers in key order.

    Each counting pass is stable, so equal keys keep their order; -0.0 is made 0.0 first, as
    the two compare equal. A pass is skipped where every key has the same byte. O(8 N) with no
    data-dependent branch, where the drafter's batches made a comparison sort's mispredicted
    branches the kernel's largest cost.
    """
    size = keys.shape[0]
    bits = (keys + 0.0).view(np.uint64)
    sign = np.uint64(1) << np.uint64(63)
    sortable = np.empty(size, np.uint64)
    for i in range(size):  # negative keys: all bits flipped; the others: the sign bit set
        value = bits[i]
        sortable[i] = ~value if value & sign else value | sign
    order = np.arange(size)
    spare = np.empty(size, np.int64)
    starts = np.empty(257, np.int64)
    for shift in range(0, 64, 8):
        digit_shift = np.uint64(shift)
        starts[:] = 0
        for i in range(size):
            starts[((sortable[i] >> digit_shift) & np.uint64(255)) + 1] += 1
        if starts.max() == size:
            continue
        for digit in range(256):
            starts[digit + 1] += starts[digit]
        for i in range(size):
            item = order[i]
            digit = (sortable[item] >> digit_shift) & np.uint64(255)
            spare[starts[digit]] = item
            starts[digit] += 1
        order, spare = spare, order
    return order


@njit(cache=True)
def check_cumulative_probs(probs, offsets):
    """(status, request) of the first check that fails on the cumulative acceptance
    probabilities ``probs[offsets[i]:offsets[i + 1]]`` of each request i: ``OUT_OF_RANGE``, the
    first probability outside [0, 1] (NaN included), before ``RISING``, the first request whose
    probabilities rise by more than 1e-12; (``OK``, -1) if none fails."""
    num_requests = offsets.shape[0] - 1
    for i in range(num_requests):
        for j in range(offsets[i], offsets[i + 1]):
            p = probs[j]
            if not (p >= 0.0 and p <= 1.0):
                return OUT_OF_RANGE, np.int64(i)
    for i in range(num_requests):
        for j in range(offsets[i], offsets[i + 1] - 1):
            if probs[j + 1] - probs[j] > 1e-12:
                return RISING, np.int64(i)
    return OK, np.int64(-1)


@njit(cache=True)
def optimal_draft_counts(
    probs,
    offsets,
    weights,
    weight_sum,
    context,
    context_scalar,
    context_sum,
    coefficients,
    min_relative_gain,
    budgets,
):
    """The budgets of :func:`policies.budget.optimal_budgets`, written to ``budgets``.

    Request i's cumulative acceptance probabilities are ``probs[offsets[i]:offsets[i + 1]]``
    (already cut to the largest budget); ``weights`` has one weight per request. ``context``
    holds each request's context tokens, or is empty: then every step reads
    ``context_scalar`` tokens whatever its drafts. ``context_sum`` is ``context.sum()`` (or the
    scalar), ``weight_sum`` is ``weights.sum()``.

    Returns (status, request): ``OK``, or the first check that failed and the request it
    names (``OUT_OF_RANGE``: a probability outside [0, 1] or NaN; ``RISING``: a request's
    probabilities rise by more than 1e-12; ``NON_POSITIVE_TIME``: the cost model predicts a
    step time <= 0). ``budgets`` is written only with ``OK``.
    """
    num_requests = offsets.shape[0] - 1
    size = probs.shape[0]
    status, index = check_cumulative_probs(probs, offsets)
    if status != OK:
        return status, index
    request = np.empty(size, np.int64)
    for i in range(num_requests):
        for j in range(offsets[i], offsets[i + 1]):
            request[j] = i
    negated = np.empty(size, np.float64)
    for j in range(size):
        negated[j] = -(probs[j] * weights[request[j]])
    # Stable: equal gains stay in (request, position) order, so the first m of the order hold
    # a prefix of every request's draft.
    order = _stable_order(negated)
    per_request_context = context.shape[0] > 0
    kv = context_sum if per_request_context else context_scalar
    rates = np.empty(size + 1, np.float64)
    produced = 0.0  # the prefix sum of gains, left to right
    attended = 0.0  # the prefix sum of the drafted tokens' contexts
    for m in range(size + 1):
        if m > 0:
            j = order[m - 1]
            produced = produced + -negated[j]
            if per_request_context:
                attended = attended + context[request[j]]
        reads = context_sum + attended if per_request_context else context_scalar
        time = _step_time(coefficients, float(num_requests + m), reads, float(m), kv)
        if time <= 0.0:
            return NON_POSITIVE_TIME, np.int64(-1)
        rates[m] = (weight_sum + produced) / time
    best = rates.max()
    num_drafted = 0
    while rates[num_drafted] < best - 1e-12 * abs(best):  # ties: the fewest drafts
        num_drafted += 1
    if best < rates[0] * (1.0 + min_relative_gain):
        num_drafted = 0
    budgets[:] = 0
    for m in range(num_drafted):
        budgets[request[order[m]]] += 1
    return OK, np.int64(-1)


@njit(cache=True)
def _repeat_in_order(values, counts, order, out):
    """``values[i]`` repeated ``counts[i]`` times into ``out``, request by request in ``order``."""
    position = 0
    for i in order:
        for _ in range(counts[i]):
            out[position] = values[i]
            position += 1


@njit(cache=True)
def drafting_bound_pays(
    counts,
    weights,
    weight_sum,
    context,
    context_scalar,
    context_sum,
    coefficients,
    min_relative_gain,
    lookup_s,
):
    """The answer of :func:`policies.budget.drafting_can_pay` for ``counts`` (caps, each >= 0,
    not all 0). ``weights`` is empty for unit weights; ``context`` is empty when every step
    reads ``context_scalar`` tokens; ``weight_sum`` / ``context_sum`` are the arrays' sums (the
    latter, or the scalar, is also the step's KV reads), all taken by the caller."""
    num_requests = counts.shape[0]
    total = 0
    for i in range(num_requests):
        total += counts[i]
    # Each request's value repeated counts[i] times, in value order (the order of equal values
    # does not matter): sorting the requests sorts the repeated values.
    weighted = weights.shape[0] > 0
    gains = np.empty(total if weighted else 0, np.float64)  # the largest weights first
    if weighted:
        _repeat_in_order(weights, counts, np.argsort(weights)[::-1], gains)
    per_request_context = context.shape[0] > 0
    cheapest = np.empty(total if per_request_context else 0, np.float64)  # smallest first
    if per_request_context:
        _repeat_in_order(context, counts, np.argsort(context), cheapest)
    kv_tokens = context_sum if per_request_context else context_scalar
    produced = 0.0
    attended = 0.0
    base_rate = 0.0
    best = -np.inf
    for m in range(total + 1):
        if m > 0:
            if per_request_context:
                attended = attended + cheapest[m - 1]
            if weighted:
                produced = produced + gains[m - 1]
        tokens = weight_sum + produced if weighted else float(num_requests) + float(m)
        reads = context_sum + attended if per_request_context else context_scalar
        time = _step_time(coefficients, float(num_requests + m), reads, float(m), kv_tokens)
        if time <= 0.0:
            return True  # optimal_budgets names the bad cost model
        rate = tokens / (time + (lookup_s if m > 0 else 0.0))
        if m == 0:
            base_rate = rate
        elif rate > best:
            best = rate
    return best >= base_rate * (1.0 + min_relative_gain) * (1.0 - 1e-9)
