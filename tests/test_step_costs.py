"""Binning a live run's engine steps by batch size, drafted against plain (das.bench.step_costs)."""

from __future__ import annotations

import math

import pytest

from das.bench.step_costs import bin_step_costs, format_step_costs


def test_steps_land_in_their_batch_bin_split_by_drafts() -> None:
    step = {
        # requests = tokens - drafts: 4 (drafted, 6 drafts), 5 (plain), 100 (plain), 100 (drafted)
        "num_tokens": [10, 5, 100, 130],
        "draft_tokens": [6, 0, 0, 30],
        "context_tokens": [1000, 500, 20000, 39000],
        "seconds": [0.08, 0.05, 0.3, 0.5],
    }
    bins = bin_step_costs([step, step], edges=(1, 8, 128))
    small, large = bins
    assert (small.low, small.high, large.low, large.high) == (1, 8, 8, 128)
    assert small.drafted_steps == 2 and small.drafted_ms == pytest.approx(80.0)
    assert small.drafted_tokens_per_step == pytest.approx(6.0)
    assert small.drafted_context_per_token == pytest.approx(100.0)
    assert small.plain_steps == 2 and small.plain_ms == pytest.approx(50.0)
    assert large.drafted_ms == pytest.approx(500.0) and large.plain_ms == pytest.approx(300.0)
    assert large.plain_context_per_token == pytest.approx(200.0)
    assert "1-7" in format_step_costs(bins)


def test_an_empty_side_is_nan_not_zero() -> None:
    (only,) = bin_step_costs(
        [{"num_tokens": [3], "draft_tokens": [0], "context_tokens": [30], "seconds": [0.1]}],
        edges=(1, 8),
    )
    assert only.drafted_steps == 0 and math.isnan(only.drafted_ms)


@pytest.mark.parametrize(
    ("observations", "edges", "message"),
    [
        ([{"num_tokens": [1]}], (1, 8), "lacks"),
        (
            [{"num_tokens": [1, 2], "draft_tokens": [0], "context_tokens": [1], "seconds": [1]}],
            (1, 8),
            "different lengths",
        ),
        ([], (8, 1), "increasing"),
    ],
)
def test_bad_observations_name_the_problem(observations, edges, message) -> None:
    with pytest.raises(ValueError, match=message):
        bin_step_costs(observations, edges=edges)
