"""The split of a speculative step's extra time by cause (:mod:`das.bench.breakdown`)."""

from __future__ import annotations

import dataclasses

import pytest

from das.bench.breakdown import time_breakdown
from das.bench.live import MethodRun, StepMeasurement, engine_kwargs_for, summarize
from das.bench.live_report import format_table

COST = {"c_base": 0.04, "c_tok": 0.001, "c_draft": 0.0002, "c_spec_request": 0.0001}


def measured(step: int, wall_s: float, iterations: int, tokens: int, **extra) -> StepMeasurement:
    return StepMeasurement(
        step=step,
        wall_s=wall_s,
        decode_iterations=iterations,
        output_tokens=tokens,
        num_requests=8,
        num_drafts=extra.pop("num_drafts", 0),
        draft_tokens=extra.pop("draft_tokens", 0),
        accepted_tokens=extra.pop("accepted_tokens", 0),
        mean_response_len=tokens / 8,
        share_truncated=0.0,
        **extra,
    )


def modelled_wall(
    iterations: int,
    tokens: int,
    drafts: int,
    accepted: int,
    propose_s: float,
    spec_step_requests: int = 0,
):
    processed = tokens + drafts - accepted
    return (
        iterations * COST["c_base"]
        + processed * COST["c_tok"]
        + drafts * COST["c_draft"]
        + spec_step_requests * COST["c_spec_request"]
        + propose_s
    )


def test_a_step_that_follows_the_cost_model_is_explained_part_by_part() -> None:
    base = measured(1, modelled_wall(500, 4000, 0, 0, 0.0), 500, 4000)
    das = measured(
        1,
        modelled_wall(400, 4100, 3000, 1000, 2.5, spec_step_requests=6000),
        400,
        4100,
        draft_tokens=3000,
        accepted_tokens=1000,
        propose_s=2.5,
        spec_step_requests=6000,
        cost_model=COST,
    )
    parts = time_breakdown(das, base)
    assert parts.iterations_s == pytest.approx(-100 * 0.04)
    assert parts.rejected_drafts_s == pytest.approx(2000 * 0.001)
    assert parts.draft_overhead_s == pytest.approx(3000 * 0.0002)
    assert parts.verify_requests_s == pytest.approx(6000 * 0.0001)
    assert parts.propose_s == pytest.approx(2.5)
    assert parts.text_length_s == pytest.approx(100 * 0.001)
    assert parts.residual_s == pytest.approx(0.0, abs=1e-9)
    assert parts.wall_delta_s == pytest.approx(das.wall_s - base.wall_s)


def test_time_the_model_does_not_price_lands_in_the_residual() -> None:
    base = measured(2, 10.0, 200, 1000)
    das = measured(2, 13.0, 200, 1000, propose_s=1.0, cost_model=COST)
    parts = time_breakdown(das, base)
    assert parts.residual_s == pytest.approx(2.0)


def test_breakdown_needs_the_same_step_and_a_cost_model() -> None:
    base = measured(1, 10.0, 200, 1000)
    with pytest.raises(ValueError, match="no cost model"):
        time_breakdown(measured(1, 9.0, 150, 1000), base)
    with pytest.raises(ValueError, match="step 2 != baseline step 1"):
        time_breakdown(measured(2, 9.0, 150, 1000, cost_model=COST), base)


def test_summary_and_table_carry_the_breakdown_of_das_steps_only() -> None:
    none = MethodRun("none", {}, steps=[measured(i, 10.0, 500, 4000) for i in range(2)])
    repeat = MethodRun("none_repeat", {}, steps=[measured(i, 10.5, 500, 4000) for i in range(2)])
    das_steps = [
        measured(
            i, 9.0, 420, 4000, draft_tokens=900, accepted_tokens=600, propose_s=0.3, cost_model=COST
        )
        for i in range(2)
    ]
    das = MethodRun("das_policy", engine_kwargs_for("das_policy", 8), steps=das_steps)
    runs = {"none": none, "none_repeat": repeat, "das_policy": das}
    summary = summarize(runs, [1])
    rows = summary["das_policy"]["time_breakdown_vs_none"]
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[1]["iterations_s"] == pytest.approx(-80 * 0.04)
    assert "time_breakdown_vs_none" not in summary["none_repeat"]
    assert summary["none_repeat"]["per_step_wall_vs_none"] == pytest.approx([1.05, 1.05])
    table = format_table(runs, dataclasses.replace(_workload(), num_steps=2))
    assert "das_policy: wall time minus none's, by cause" in table
    assert "none_repeat: wall time" not in table


def test_the_a_a_engine_is_a_plain_no_speculation_engine() -> None:
    assert engine_kwargs_for("none_repeat", 16) == engine_kwargs_for("none", 16) == {}


def _workload():
    from das.bench.live import LiveWorkload

    return LiveWorkload(num_prompts=1, num_samples=8, num_steps=2)


def test_a_step_keeps_only_its_own_cost_observations() -> None:
    from das.bench.live import step_cost_observations

    window = {"num_tokens": [1.0, 2.0, 3.0, 4.0], "seconds": [0.1, 0.2, 0.3, 0.4]}
    assert step_cost_observations(window, 3) == {
        "num_tokens": [2.0, 3.0, 4.0],
        "seconds": [0.2, 0.3, 0.4],
    }
    assert step_cost_observations(window, 10)["seconds"] == [0.1, 0.2, 0.3, 0.4]
    assert step_cost_observations(window, 0) is None
    assert step_cost_observations(None, 5) is None
