"""Where a speculative step's time goes, against the same step without speculation.

A live step's wall time is modelled, with the speculative engine's own online fit of its step
cost (:class:`policies.cost_model.StepCostModel`: ``c_base`` per iteration, ``c_tok`` per
processed token, ``c_draft`` more per verified draft token), as::

    wall ~ iterations * c_base + processed_tokens * c_tok + draft_tokens * c_draft
           + spec_step_requests * c_spec_request + propose_s

where a speculative engine processes its output tokens plus every rejected draft token. The
difference between a DAS step and the no-speculation engine's step then splits into:

* ``iterations_s``: ``c_base`` times the change in iterations (negative: what drafting saved);
* ``rejected_drafts_s``: ``c_tok`` per rejected draft token (verified for nothing);
* ``draft_overhead_s``: ``c_draft`` per draft token (what verifying a draft costs beyond a token);
* ``verify_requests_s``: ``c_spec_request`` per request of every engine step that verified any
  draft (vLLM's verify path samples the whole batch, not only the drafted rows);
* ``propose_s``: DAS's measured time inside ``propose`` (drafting, bookkeeping, policy);
* ``text_length_s``: ``c_tok`` times the change in output tokens (0 when both engines sampled
  the same rollouts, as with position-keyed sampling);
* ``residual_s``: what the model does not explain (vLLM's speculative-mode overhead outside
  DAS, the model's error, and the machine's noise, which an A/A run of two no-speculation
  engines measures).

The parts sum to the measured difference by construction; only the residual is not priced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["StepTimeBreakdown", "time_breakdown"]


class MeasuredStep(Protocol):
    """What :func:`time_breakdown` reads of a step (a :class:`das.bench.live.StepMeasurement`)."""

    step: int
    wall_s: float
    decode_iterations: int
    output_tokens: int
    draft_tokens: int
    accepted_tokens: int
    propose_s: float | None
    spec_step_requests: int | None
    cost_model: Mapping[str, float] | None


@dataclass(frozen=True)
class StepTimeBreakdown:
    """A speculative step's wall time minus the baseline's, in seconds, split by cause."""

    step: int
    wall_delta_s: float
    iterations_s: float
    rejected_drafts_s: float
    draft_overhead_s: float
    verify_requests_s: float
    propose_s: float
    text_length_s: float
    residual_s: float
    c_base: float
    c_tok: float
    c_draft: float
    c_spec_request: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_breakdown(candidate: MeasuredStep, baseline: MeasuredStep) -> StepTimeBreakdown:
    """Split ``candidate.wall_s - baseline.wall_s`` by cause under ``candidate.cost_model``.

    Raises:
        ValueError: if the steps differ, or ``candidate`` carries no cost model.
    """
    if candidate.step != baseline.step:
        raise ValueError(f"candidate step {candidate.step} != baseline step {baseline.step}")
    if not candidate.cost_model:
        raise ValueError(f"step {candidate.step} has no cost model to price its time with")
    cost = candidate.cost_model
    c_base, c_tok = float(cost["c_base"]), float(cost["c_tok"])
    c_draft = float(cost.get("c_draft", 0.0))
    delta = candidate.wall_s - baseline.wall_s
    iterations_s = c_base * (candidate.decode_iterations - baseline.decode_iterations)
    rejected_drafts_s = c_tok * (candidate.draft_tokens - candidate.accepted_tokens)
    draft_overhead_s = c_draft * candidate.draft_tokens
    c_spec_request = float(cost.get("c_spec_request", 0.0))
    verify_requests_s = c_spec_request * (candidate.spec_step_requests or 0)
    propose_s = float(candidate.propose_s or 0.0)
    text_length_s = c_tok * (candidate.output_tokens - baseline.output_tokens)
    explained = (
        iterations_s
        + rejected_drafts_s
        + draft_overhead_s
        + verify_requests_s
        + propose_s
        + text_length_s
    )
    return StepTimeBreakdown(
        step=candidate.step,
        wall_delta_s=delta,
        iterations_s=iterations_s,
        rejected_drafts_s=rejected_drafts_s,
        draft_overhead_s=draft_overhead_s,
        verify_requests_s=verify_requests_s,
        propose_s=propose_s,
        text_length_s=text_length_s,
        residual_s=delta - explained,
        c_base=c_base,
        c_tok=c_tok,
        c_draft=c_draft,
        c_spec_request=c_spec_request,
    )
