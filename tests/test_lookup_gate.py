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


def test_the_average_follows_newer_passes() -> None:
    gate = LookupGate(lookup_s_per_request=0.001, weight=0.5)
    gate.record(4, accepted_tokens=0, plain_step_s=0.01, drafted_step_s=0.01)
    gate.record(4, accepted_tokens=8, plain_step_s=0.01, drafted_step_s=0.01)
    assert gate.saving_per_request[2] == pytest.approx(0.5 * 8 * 0.0025 / 4)


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
