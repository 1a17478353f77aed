"""The budget policy's compiled parts: the radix-sorted stable order and the step time, each
against the numpy operation it stands in for (the policy's budgets must not move by a bit)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import _budget_kernels as K
from policies.budget import _coefficients
from policies.cost_model import StepCostModel
from policies.profiles import load_cost_model, policy_cost_model


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(
        st.lists(st.sampled_from([-1.0, -0.5, -0.25, -0.0, 0.0, -0.75]), max_size=7), max_size=9
    )
)
def test_the_radix_order_is_numpys_stable_argsort(runs):
    # Few distinct keys, -0.0 among them: ties are the rule (runs: a request's negated gains).
    keys = np.array([key for run in runs for key in run], dtype=np.float64)
    np.testing.assert_array_equal(K._stable_order(keys), np.argsort(keys, kind="stable"))


def test_the_radix_order_on_drafter_sized_batches():
    # 210 requests of 16 falling gains each: full precision, and rounded so that equal gains
    # span many requests.
    rng = np.random.default_rng(3)
    gains = np.cumprod(rng.random((210, 16)), axis=1)
    for keys in (-gains.reshape(-1), -np.round(gains, 2).reshape(-1)):
        np.testing.assert_array_equal(K._stable_order(keys), np.argsort(keys, kind="stable"))


def test_the_kernel_step_time_is_the_cost_models_to_the_bit():
    rng = np.random.default_rng(5)
    models = [policy_cost_model(load_cost_model(name)) for name in ("h100", "cpu")]
    models.append(StepCostModel(0.007, 2e-5, 96.0, 3e-9, 4e-6, 5e-6, 2e-5, 1e-9))
    for cost in models:
        coefficients = _coefficients(cost)
        tokens = rng.integers(1, 5000, 200).astype(np.float64)
        drafts = np.where(rng.random(200) < 0.2, 0.0, np.minimum(tokens - 1, 300.0))
        attended = rng.integers(0, 10**7, 200).astype(np.float64)
        kv = float(rng.integers(0, 10**7))
        expected = cost.step_times(tokens, attended, drafts, kv_tokens=kv)
        rows = zip(tokens, attended, drafts, strict=True)
        got = [K._step_time(coefficients, t, a, d, kv) for t, a, d in rows]
        assert np.array_equal(np.array(got), expected), cost


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="tests compilation itself")
def test_a_cost_model_policy_compiles_the_kernels_when_built():
    # A fresh process: an earlier test of this one may have compiled them already.
    code = (
        "from policies.budget import CostModelPolicy\n"
        "from policies.cost_model import StepCostModel\n"
        "from policies import _budget_kernels as K\n"
        "assert not K.optimal_draft_counts.signatures\n"
        "CostModelPolicy(StepCostModel(c_base=0.01, c_tok=0.001))\n"
        "kernels = (K.optimal_draft_counts, K.drafting_bound_pays)\n"
        "print([k.__name__ for k in kernels if not k.signatures])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "[]", result.stdout
