"""Draft budgets and the step cost model: pure functions of plain numbers, no engine needed."""

from policies.budget import (
    BudgetPolicy,
    CostModelPolicy,
    FixedPolicy,
    LengthClass,
    LengthClassBudgetPolicy,
    LengthClassPolicy,
    RequestView,
    expected_produced_tokens,
    fixed_budgets,
    optimal_budgets,
    remaining_length_weights,
)
from policies.cost_model import OnlineCostFitter, StepCostModel, fit_step_cost, parse_cost_spec
from policies.cost_table import StepCostTable
from policies.profiles import PROFILE_NAMES, h100_profile, load_cost_model, load_profile
from policies.step_shapes import StepShapes

__all__ = [
    "PROFILE_NAMES",
    "BudgetPolicy",
    "CostModelPolicy",
    "FixedPolicy",
    "LengthClass",
    "LengthClassBudgetPolicy",
    "LengthClassPolicy",
    "OnlineCostFitter",
    "RequestView",
    "StepCostModel",
    "StepCostTable",
    "StepShapes",
    "expected_produced_tokens",
    "fit_step_cost",
    "fixed_budgets",
    "h100_profile",
    "load_cost_model",
    "load_profile",
    "optimal_budgets",
    "parse_cost_spec",
    "remaining_length_weights",
]
