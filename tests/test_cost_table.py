"""The measured whole-step table model (policies.cost_table) and its packaged profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from policies.cost_model import parse_cost_spec
from policies.cost_table import StepCostTable, load_step_table, packaged_table_path
from policies.profiles import (
    MEASURED_CPU_PROFILE,
    costs_dir,
    fit_step_table,
    load_cost_model,
    load_profile,
    step_table,
    table_cells,
)
from policies.step_shapes import StepShapes

FIT_REPORT = Path(__file__).resolve().parent.parent / "benchmarks/results/gpu_step_cost_fit.json"


def decode_shapes(batch, q, length) -> StepShapes:
    batch, q, length = (np.asarray(v, dtype=np.float64) for v in (batch, q, length))
    return StepShapes.from_columns(
        num_tokens=np.rint(batch * q).astype(np.int64),
        num_requests=batch.astype(np.int64),
        kv_tokens=np.rint(batch * length).astype(np.int64),
    )


def small_table(**overrides) -> StepCostTable:
    # 2 x 2 x 2 grid: 10 ms base, +1 ms per 4x requests, +2 ms per 4x q, +4 ms per 4x L.
    grid = np.array(
        [[[10.0 + 1 * b + 2 * q + 4 * L for L in (0, 1)] for q in (0, 1)] for b in (0, 1)]
    )
    arguments = dict(
        name="small",
        batch_sizes=[1, 4],
        query_lens=[1, 4],
        context_lens=[512, 2048],
        step_ms=grid,
    )
    arguments.update(overrides)
    return StepCostTable(**arguments)


# --------------------------------------------------------------------------- the packaged table


@pytest.mark.parametrize("name", ["h100_qwen25_7b_unfused", "h100_qwen3_8b_step_unfused"])
def test_packaged_table_reproduces_every_measured_cell(name: str) -> None:
    table = step_table(name)
    grid = table.grid_ms()
    measured = ~np.isnan(table.step_ms)
    batch, q, length = np.meshgrid(
        table.batch_sizes, table.query_lens, table.context_lens, indexing="ij"
    )
    predicted = table.times(decode_shapes(batch[measured], q[measured], length[measured])) * 1e3
    np.testing.assert_allclose(predicted, grid[measured], rtol=1e-12)
    # Only cells raised to a smaller neighbour's time (noise) differ from the measurement,
    # and by under 1%.
    raised = grid[measured] != table.step_ms[measured]
    assert raised.sum() == table.num_raised_cells <= 6
    np.testing.assert_allclose(grid[measured], table.step_ms[measured], rtol=0.01)


@pytest.mark.parametrize("name", ["h100", "h100_qwen25_7b_unfused", "h100_qwen3_8b_step"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_packaged_table_is_monotone_between_cells(name: str, axis: int) -> None:
    table = step_table(name)
    axes = [table.batch_sizes, table.query_lens, table.context_lens]
    start = axes[axis][0] / 2 if axis == 2 else 1.0  # at least one request and one token each
    sweep = np.geomspace(start, axes[axis][-1] * 2, 400)
    for fixed in np.ndindex(*(len(a) for i, a in enumerate(axes) if i != axis)):
        others = iter(fixed)
        values = [
            sweep if i == axis else np.full(sweep.size, axes[i][next(others)]) for i in range(3)
        ]
        ms = table.decode_ms(values[0], values[0] * values[1], values[0] * values[2])
        assert np.all(np.diff(ms) >= -1e-9), (axis, fixed)


def test_between_two_cells_the_time_lies_between_them() -> None:
    table = step_table("h100_qwen25_7b_unfused")
    # B = 64, L = 8192: q = 8 measured 25.35 ms, q = 16 measured 41.90 ms; q = 12 is linear.
    low, high = table.decode_ms([64, 64], [64 * 8, 64 * 16], [64 * 8192] * 2)
    middle = float(table.decode_ms(64, 64 * 12, 64 * 8192))
    assert middle == pytest.approx((low + high) / 2)


def test_unmeasured_cells_extrapolate_in_context() -> None:
    table = step_table("h100_qwen25_7b_unfused")
    # B = 128, L = 16384 did not fit on the GPU: it continues the L = 2048 -> 8192 slope.
    at = table.decode_ms([128] * 3, [128] * 3, [128 * 2048, 128 * 8192, 128 * 16384])
    assert at[2] - at[1] == pytest.approx((at[1] - at[0]) * (16384 - 8192) / (8192 - 2048))


def test_mixed_contexts_are_priced_at_their_mean() -> None:
    table = small_table()
    # 4 requests, mean context 1280 (half way between 512 and 2048): 10 + 1 + 2 = 13 ms.
    assert table.decode_ms(4, 4, 4 * 1280) == pytest.approx(13.0)


# --------------------------------------------------------------------------- bad input


def test_bad_shapes_raise_naming_the_value() -> None:
    table = small_table()
    with pytest.raises(ValueError, match=r"num_tokens=3 < num_requests=4"):
        table.decode_ms(4, 3, 100)
    with pytest.raises(ValueError, match=r"num_tokens=5 with num_requests=0"):
        table.decode_ms(0, 5, 0)
    with pytest.raises(ValueError, match="kv_tokens"):
        table.decode_ms(1, 1, -1)
    with pytest.raises(ValueError, match="must be a StepShapes"):
        table.times({"num_tokens": [1]})
    with pytest.raises(ValueError, match=r"context_lens=\[2048.0, 512.0\] must be ascending"):
        small_table(context_lens=[2048, 512])
    with pytest.raises(ValueError, match=r"step_ms has shape"):
        small_table(step_ms=np.ones((2, 2)))
    with pytest.raises(ValueError, match="neither a file nor a table"):
        load_step_table("h100_70b_step.json")


def test_steps_without_requests_cost_nothing_but_their_prefill() -> None:
    table = small_table(prefill_tokens=[512, 4096], prefill_ms=[20.0, 90.0])
    shapes = StepShapes.from_columns(num_tokens=[0, 0], num_requests=0, prefill_tokens=[0, 4096])
    np.testing.assert_allclose(table.times(shapes) * 1e3, [0.0, 90.0])


# --------------------------------------------------------------------------- prefill, fused


def test_prefill_adds_the_curve_difference() -> None:
    table = small_table(prefill_tokens=[512, 4096], prefill_ms=[20.0, 90.0])
    base = StepShapes.from_columns(num_tokens=[4] * 3, num_requests=4, kv_tokens=4 * 512)
    prefill = StepShapes.from_columns(
        num_tokens=[4] * 3, num_requests=4, kv_tokens=4 * 512, prefill_tokens=[100, 508, 4092]
    )
    extra = (table.times(prefill) - table.times(base)) * 1e3
    # Below 512 tokens the curve is flat (the step's weight reads carry a small prefill); at
    # 4 + 4092 = 4096 tokens it adds the measured 90 ms less the flat 20.
    np.testing.assert_allclose(extra, [0.0, 0.0, 70.0])


def test_packaged_prefill_cells_price_prefill_steps() -> None:
    table = step_table("h100")
    # Measured: 4 prompts of 512 tokens, 44.18 ms; 16 of 512, 173.34 ms (one forward each).
    shapes = StepShapes.from_columns(num_tokens=[0, 0], num_requests=0, prefill_tokens=[2048, 8192])
    np.testing.assert_allclose(table.times(shapes) * 1e3, [44.1796, 173.3397])
    # Fitted roofline: the prefill slope between the two largest measured prefills.
    assert load_profile("h100").c_prefill == pytest.approx((685.6559 - 173.3397) / 24576 / 1e3)


def test_prefill_curve_comes_from_the_reference_prompt_length() -> None:
    # The decode grid of the packaged table, with synthetic prefill cells.
    content = json.loads(packaged_table_path("h100_qwen25_7b_step.json").read_text())
    content["prefill"] = {
        "columns": ["B", "prompt_len", "ms"],
        "cells": [[1, 512, 20.0], [4, 512, 40.0], [1, 2048, 99.0], [8, 512, 75.0]],
    }
    table = StepCostTable.from_dict(content)
    np.testing.assert_allclose(table.prefill_tokens, [512, 2048, 4096])
    np.testing.assert_allclose(table.prefill_ms, [20.0, 40.0, 75.0])
    assert float(table.prefill_curve_ms(3072)) == pytest.approx(40.0 + 35.0 * np.log2(1.5))


def test_fused_correction_subtracts_the_measured_saving() -> None:
    fused = small_table(fused_tokens=[1, 16], fused_savings_ms=[1.0, 2.0])
    unfused = small_table(fused_tokens=[1, 16], fused_savings_ms=[1.0, 2.0], fused=False)
    shapes = decode_shapes([1, 4, 4], [1, 4, 1], [512, 512, 2048])  # 1, 16 and 4 tokens
    saving = (unfused.times(shapes) - fused.times(shapes)) * 1e3
    np.testing.assert_allclose(saving, [1.0, 2.0, 1.5])


# --------------------------------------------------------------------------- profiles


def test_profiles_load_from_the_package_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DAS_COSTS_DIR", str(tmp_path))  # an empty folder: nothing read there
    monkeypatch.chdir(tmp_path)
    step_table.cache_clear()  # read the tables anew, under this environment
    table = load_cost_model("h100")
    assert isinstance(table, StepCostTable)
    assert float(table.decode_ms(1, 1, 512)) == pytest.approx(7.0, abs=1.5)
    assert load_profile("h100").c_base > 0
    assert MEASURED_CPU_PROFILE.is_file()
    assert load_profile(MEASURED_CPU_PROFILE).c_base > 0
    monkeypatch.delenv("DAS_COSTS_DIR")
    assert costs_dir() == packaged_table_path("h100_qwen_shapes.json").parent
    assert load_profile("h100_7b").c_base > 0  # the GEMM profile's table is packaged too


def test_load_cost_model_keeps_specs_and_gemm_profiles() -> None:
    assert load_cost_model("0.01,0.002") == parse_cost_spec("0.01,0.002")
    assert load_cost_model("h100_7b") == load_profile("h100_7b")
    # "cpu" names the packaged CPU measurement, not a file in the working directory.
    assert load_cost_model("cpu") == load_profile(MEASURED_CPU_PROFILE)


@pytest.mark.skipif(not FIT_REPORT.is_file(), reason="no fit report in this checkout")
@pytest.mark.parametrize(
    "name", ["h100", "h100_qwen25_7b_unfused", "h100_qwen3_8b_step", "h100_qwen3_8b_step_unfused"]
)
def test_fitted_roofline_error_is_what_the_report_says(name: str) -> None:
    report = json.loads(FIT_REPORT.read_text())["profiles"][name]
    table = step_table(name)
    model = fit_step_table(table)
    reported = parse_cost_spec(report["model"])
    shapes, seconds = table_cells(table)
    errors = np.abs(model.times(shapes) - seconds) / seconds
    reported_errors = np.abs(reported.times(shapes) - seconds) / seconds
    assert np.max(errors) == pytest.approx(report["error"]["max"], abs=1e-4)
    assert np.median(errors) == pytest.approx(report["error"]["median"], abs=1e-4)
    np.testing.assert_allclose(reported_errors, errors, atol=1e-6)
    assert report["error"]["cells"] == np.count_nonzero(~np.isnan(table.step_ms))
    per_cell = np.array(report["cells"])[:, 5]
    np.testing.assert_allclose(per_cell, errors, atol=1e-4)
