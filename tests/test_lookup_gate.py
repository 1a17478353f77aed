"""The lookup gate: batch sizes whose lookups saved less than they took are skipped."""

from __future__ import annotations

import numpy as np
import pytest

from das.lookup_gate import LookupGate
from policies.budget import drafting_can_pay
from policies.cost_model import StepCostModel


def test_a_band_is_looked_up_while_its_accepted_tokens_save_more_than_the_lookup() -> None:
    gate = LookupGate(lookup_s_per_request=0.001, explore_every=4)
    # Batches of 2 in 10 ms steps: each accepted token saves 5 ms; 4 of them, drafts free.
    gate.record(2, accepted_tokens=4, plain_step_s=0.010, drafted_step_s=0.010)
    assert gate.saving_per_request[1] == pytest.approx(0.010)
    assert all(gate.should_look_up(3) for _ in range(10))  # 3 is in the band of 2
    # Batches of 8: one accepted token (1.25 ms) against 10 ms more of verifying.
    gate.record(8, accepted_tokens=1, plain_step_s=0.010, drafted_step_s=0.020)
    assert gate.saving_per_request[3] == pytest.approx((0.00125 - 0.010) / 8)
    assert [gate.should_look_up(8) for _ in range(8)] == [False, False, False, True] * 2
    assert gate.should_look_up(16)  # a band never looked up is looked up


def test_the_average_starts_as_a_mean_and_then_follows_newer_passes() -> None:
    gate = LookupGate(lookup_s_per_request=0.001, weight=0.25)
    # Batches of 4 in 10 ms steps: an accepted token saves 2.5 ms, 0.625 ms per request.
    for accepted in (0, 8, 4, 4):  # the first 1 / weight passes: their mean
        gate.record(4, accepted_tokens=accepted, plain_step_s=0.01, drafted_step_s=0.01)
    assert gate.saving_per_request[2] == pytest.approx(4 * 0.000625)
    gate.record(4, accepted_tokens=0, plain_step_s=0.01, drafted_step_s=0.01)
    assert gate.saving_per_request[2] == pytest.approx(0.75 * 4 * 0.000625)


def test_free_lookups_are_never_skipped_and_bad_settings_are_named() -> None:
    gate = LookupGate(lookup_s_per_request=0.0)
    gate.record(4, accepted_tokens=0, plain_step_s=0.01, drafted_step_s=0.05)
    assert all(gate.should_look_up(4) for _ in range(40))
    with pytest.raises(ValueError, match="lookup_s_per_request"):
        LookupGate(lookup_s_per_request=-1.0)
    with pytest.raises(ValueError, match="weight"):
        LookupGate(lookup_s_per_request=0.001, weight=0.0)


def test_a_lookup_that_even_sure_drafts_cannot_pay_for_stops_drafting() -> None:
    # One request, flat 10 ms steps: four sure draft tokens make 5 tokens in 10 ms, against
    # 1 in 10 ms; with a 50 ms lookup, 5 tokens in 60 ms do not beat 1 in 10 ms.
    cost = StepCostModel(c_base=0.01, c_tok=0.0, knee_tokens=1000)
    caps = np.array([4])
    assert drafting_can_pay(caps, cost)
    assert drafting_can_pay(caps, cost, lookup_s=0.030)
    assert not drafting_can_pay(caps, cost, lookup_s=0.050)


def test_a_measured_band_costs_the_median_of_its_recent_lookups() -> None:
    gate = LookupGate(lookup_s_per_request=None, weight=1.0)  # savings: the last pass's
    assert gate.measures and gate.cost_per_request(8) is None
    # Not yet measured: looked up, whatever it saved.
    gate.record(8, accepted_tokens=0, plain_step_s=0.010, drafted_step_s=0.010)
    assert gate.should_look_up(8)
    # A first lookup that compiled a kernel (1 s for 8 requests), then 15 of 90 us for 9.
    gate.record_lookup(8, 1.0)
    for _ in range(3):
        gate.record_lookup(9, 90e-6)
    assert gate.cost_per_request(8) is None  # 4 lookups timed: too few to price the band
    for _ in range(12):
        gate.record_lookup(9, 90e-6)
    assert gate.cost_per_request(12) == pytest.approx(10e-6)
    assert gate.cost_per_request(4) is None  # another band
    # Saving 25 us per request pays for 10 us; verifying 5 us per request for nothing does not.
    gate.record(8, accepted_tokens=4, plain_step_s=0.0004, drafted_step_s=0.0004)
    assert gate.saving_per_request[3] == pytest.approx(25e-6)
    assert gate.should_look_up(8)
    gate.record(8, accepted_tokens=0, plain_step_s=0.0004, drafted_step_s=0.00044)
    assert not gate.should_look_up(8)


def test_the_drafter_config_takes_auto_or_a_price() -> None:
    from das.config import DASConfig

    assert DASConfig().lookup_s_per_request is None  # measured by default
    assert DASConfig(lookup_us_per_request=12.5).lookup_s_per_request == pytest.approx(12.5e-6)
    for bad in ("fast", -1.0, True):
        with pytest.raises(ValueError, match="lookup_us_per_request"):
            DASConfig(lookup_us_per_request=bad)


def test_lookups_that_take_a_small_share_of_the_step_are_never_skipped() -> None:
    """The same lookups that save nothing are skipped beside a 0.4 ms step (80 us for 8
    requests is 20% of it) but not beside an 8 ms step (1%): skipping could gain 1% at most."""
    looked_up = {}
    for step_s in (0.0004, 0.008):
        gate = LookupGate(lookup_s_per_request=10e-6, weight=1.0)
        gate.record(8, accepted_tokens=0, plain_step_s=step_s, drafted_step_s=step_s * 1.1)
        looked_up[step_s] = sum(gate.should_look_up(8) for _ in range(32))
    assert looked_up == {0.0004: 2, 0.008: 32}
