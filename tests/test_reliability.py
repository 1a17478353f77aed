"""The reliability calibration of predicted cumulative acceptance, alone and in the drafter."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from das.config import DASConfig
from das.drafter import DASDrafter
from das.reliability import ReliabilityCalibration, isotonic_increasing
from policies.budget import BatchView, BudgetPolicy


def brute_force_isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The best non-decreasing step fit, by trying every split into constant blocks."""
    n = values.size
    best, best_cost = None, np.inf
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        fit = np.empty(n)
        for lo, hi in itertools.pairwise(cuts):
            fit[lo:hi] = np.average(values[lo:hi], weights=weights[lo:hi])
        if np.all(np.diff(fit) >= -1e-12):
            cost = float(np.sum(weights * (values - fit) ** 2))
            if cost < best_cost:
                best, best_cost = fit, cost
    return best


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1), st.floats(0.1, 10)),
        min_size=1,
        max_size=7,
    )
)
def test_isotonic_fit_is_the_least_squares_monotone_fit(pairs):
    values = np.array([v for v, _ in pairs])
    weights = np.array([w for _, w in pairs])
    fit = isotonic_increasing(values, weights)
    np.testing.assert_allclose(fit, brute_force_isotonic(values, weights), atol=1e-6)


def test_without_observations_the_map_is_the_identity_between_bin_centres():
    calibration = ReliabilityCalibration()
    predicted = np.array([[0.9, 0.6, 0.3, 0.1, 0.0]])
    np.testing.assert_allclose(calibration.apply(predicted), predicted)


def test_observed_outcomes_pull_predictions_to_the_observed_rates():
    calibration = ReliabilityCalibration(prior=20.0)
    for _ in range(200):
        # A draft predicted 0.975 then 0.025 (the end bins' centres, where no pooling with
        # a neighbour applies): its first token is always accepted, its second never.
        calibration.record(np.array([0.975, 0.025]), num_accepted=1)
    mapped = calibration.apply(np.array([[0.975, 0.025, 0.0]]))[0]
    assert mapped[0] == pytest.approx((200 + 20 * 0.975) / 220)
    assert mapped[1] == pytest.approx(20 * 0.025 / 220)
    assert mapped[2] == 0.0  # past the draft's end stays empty


def test_a_batch_of_drafts_counts_each_position_within_its_own_draft():
    calibration = ReliabilityCalibration()
    # Two drafts: the first's first two positions accepted, the second's first one.
    calibration.record_many([np.array([0.975, 0.525, 0.025]), np.array([0.525, 0.475])], [2, 1])
    expected_tried, expected_accepted = np.zeros(20), np.zeros(20)
    expected_tried[[19, 10, 0, 9]] = [1, 2, 1, 1]
    expected_accepted[[19, 10]] = [1, 2]
    np.testing.assert_array_equal(calibration.tried, expected_tried)
    np.testing.assert_array_equal(calibration.accepted, expected_accepted)


def test_mapped_rows_never_increase_along_a_draft():
    calibration = ReliabilityCalibration(prior=1.0)
    # Observations that a plain per-bin map would turn into a rise: 0.45 never accepted,
    # 0.35 always (the isotonic fit pools them; the row stays non-increasing regardless).
    for _ in range(100):
        calibration.record(np.array([0.45]), num_accepted=0)
        calibration.record(np.array([0.35]), num_accepted=1)
    rates = calibration.rates()
    assert np.all(np.diff(rates) >= 0)
    mapped = calibration.apply(np.array([[0.45, 0.35, 0.3]]))[0]
    assert np.all(np.diff(mapped) <= 0)


def test_each_step_halves_the_weight_of_what_was_observed():
    calibration = ReliabilityCalibration(prior=10.0, decay=0.5)
    for accepted in [1, 0] * 5:  # half of ten drafts predicted 0.525 (a bin centre) accepted
        calibration.record(np.array([0.525]), num_accepted=accepted)
    bin_ = ReliabilityCalibration.bins(np.array([0.525]))[0]
    assert calibration.tried[bin_] == 10 and calibration.accepted[bin_] == 5
    before = calibration.apply(np.array([[0.525]]))[0, 0]
    calibration.new_step()
    assert calibration.tried[bin_] == 5 and calibration.accepted[bin_] == 2.5
    after = calibration.apply(np.array([[0.525]]))[0, 0]
    assert before == pytest.approx((5 + 10 * 0.525) / 20)
    assert after == pytest.approx((2.5 + 10 * 0.525) / 15)


@pytest.mark.parametrize(
    "bad, message", [({"prior": 0.0}, "prior=0.0"), ({"decay": 1.5}, "decay=1.5")]
)
def test_bad_settings_name_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        ReliabilityCalibration(**bad)


class RecordingPolicy(BudgetPolicy):
    """Gives every request its whole draft and keeps what it was shown."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def batch_budgets(self, batch: BatchView, cost=None) -> np.ndarray:
        self.seen.append(batch.cumulative_probs.copy())
        return np.full(len(batch), batch.cumulative_probs.shape[1], np.int64)


def start_loop_request(policy: BudgetPolicy, enabled: bool) -> DASDrafter:
    config = DASConfig(
        use_global_tree=False,
        use_prompt_history=False,
        num_speculative_tokens=4,
        reliability_calibration=enabled,
    )
    drafter = DASDrafter(config, policy=policy)
    drafter.begin_step(1)
    drafter.start_request(1, LOOP * 3)
    return drafter


LOOP = [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_drafter_without_the_map_keeps_no_reliability_statistics():
    drafter = start_loop_request(RecordingPolicy(), enabled=False)
    draft = drafter.propose([1]).draft_tokens()[0]
    assert len(draft) == 4
    drafter.extend_request(1, [*draft[:2], 99])
    assert drafter.calibration.accepted.sum() == 2  # the draft was scored
    assert drafter.reliability.tried.sum() == 0


def test_the_drafter_records_each_verified_position_in_the_bin_of_its_prediction():
    drafter = start_loop_request(RecordingPolicy(), enabled=True)
    proposal = drafter.propose([1])
    draft = proposal.draft_tokens()[0]
    predicted = drafter._requests[1].pending_cumulative
    assert len(draft) == predicted.size == 4
    # The target accepts two draft tokens, then differs.
    drafter.extend_request(1, [*draft[:2], 99])
    expected_tried = np.bincount(ReliabilityCalibration.bins(predicted), minlength=20)
    expected_accepted = np.bincount(ReliabilityCalibration.bins(predicted[:2]), minlength=20)
    np.testing.assert_allclose(drafter.reliability.tried, expected_tried)
    np.testing.assert_allclose(drafter.reliability.accepted, expected_accepted)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_policy_sees_the_mapped_predictions_when_enabled(enabled):
    policy = RecordingPolicy()
    drafter = start_loop_request(policy, enabled)
    # Earlier drafts were rejected at once at every predicted value.
    for centre in (np.arange(20) + 0.5) / 20:
        for _ in range(50):
            drafter.reliability.record(np.array([centre]), num_accepted=0)
    drafter.propose([1])
    shown = policy.seen[-1][0]
    predicted = drafter._requests[1].pending_cumulative
    assert predicted.min() > 0.5
    if enabled:
        np.testing.assert_allclose(shown, drafter.reliability.apply(predicted[None, :])[0])
        assert shown.max() < 0.5 * predicted.min()
    else:
        np.testing.assert_allclose(shown, predicted)
