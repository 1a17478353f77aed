"""Offline replay: run a recorded multi-step trace through a drafter as an engine would.

Each step's rollouts run as one batch. Every decode iteration, each unfinished request gets a
draft; its tokens are accepted while they equal the recorded response (the greedy-acceptance
model of the recorded output), then the target's own next token is added, so a forward pass
yields ``accepted + 1`` tokens. The batch shrinks as requests finish. A step cost model turns
each iteration's token count into modelled seconds. Prefill is left out (the same for every
method).

Knows nothing of vLLM: a drafter is anything with the lifecycle below (``das.drafter``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from policies.cost_model import StepCostModel
from rollouts.trace import RolloutRecord

logger = logging.getLogger(__name__)


class Drafter(Protocol):
    def begin_step(self, step: int | None = None) -> Any: ...

    def start_request(
        self, request_id: Hashable, prompt_tokens: Iterable[int], prompt_key: str | None = None
    ) -> Any: ...

    def propose(self, request_ids: Sequence[Hashable]) -> Any: ...

    def extend_many(
        self, request_ids: Sequence[Hashable], tokens: Sequence[np.ndarray]
    ) -> None: ...

    def finish_request(
        self, request_id: Hashable, finish_reason: str, stop_token_ids: Iterable[int] = ()
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class StepResult:
    """One replayed step of one method."""

    step: int
    num_requests: int
    forward_passes: int  # decode iterations until the last request finished (the makespan)
    modelled_s: float
    output_tokens: int
    draft_tokens: int
    accepted_tokens: int
    mean_accepted_len: float  # tokens per request per forward pass (1 = no speculation gain)
    drafter_s: float  # wall time spent inside the drafter
    # Per decode iteration: tokens verified and KV tokens read, to model any other cost curve.
    iteration_tokens: np.ndarray
    iteration_context_tokens: np.ndarray
    iteration_draft_tokens: np.ndarray

    @property
    def wasted_draft_tokens(self) -> int:
        return self.draft_tokens - self.accepted_tokens

    def modelled_under(self, cost: StepCostModel) -> StepResult:
        """The same step with its time modelled by another cost curve (passes are unchanged)."""
        seconds = cost.step_times(
            self.iteration_tokens, self.iteration_context_tokens, self.iteration_draft_tokens
        )
        return dataclasses.replace(self, modelled_s=float(seconds.sum()))

    def to_dict(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del row["iteration_tokens"], row["iteration_context_tokens"], row["iteration_draft_tokens"]
        return {**row, "wasted_draft_tokens": self.wasted_draft_tokens}


def replay_step(
    step: int,
    records: Sequence[RolloutRecord],
    drafter: Drafter | None,
    cost: StepCostModel,
) -> StepResult:
    """Replay one step's rollouts as one batch; ``drafter=None`` means no speculation."""
    num = len(records)
    lengths = np.array([r.num_response_tokens for r in records], dtype=np.int64)
    prompt_lengths = np.array([r.num_prompt_tokens for r in records], dtype=np.int64)
    width = int(lengths.max(initial=0))
    # One padding column of -1: draft positions past a response's end read it and never match.
    responses = np.full((num, width + 1), -1, dtype=np.int64)
    for i, record in enumerate(records):
        responses[i, : lengths[i]] = record.response_tokens
    drafter_s = 0.0
    started = time.perf_counter()
    if drafter is not None:
        drafter.begin_step(step)
        for i, record in enumerate(records):
            drafter.start_request(i, record.prompt_tokens, record.prompt_key)
    drafter_s += time.perf_counter() - started

    position = np.zeros(num, dtype=np.int64)
    active = np.flatnonzero(lengths > 0)
    passes = modelled = 0.0
    iteration_tokens: list[int] = []
    iteration_context: list[int] = []
    iteration_drafts: list[int] = []
    draft_tokens = accepted_tokens = request_passes = 0
    while active.size:
        num_drafted = np.zeros(active.size, dtype=np.int64)
        accepted = np.zeros(active.size, dtype=np.int64)
        if drafter is not None:
            started = time.perf_counter()
            proposal = drafter.propose(active.tolist())
            drafter_s += time.perf_counter() - started
            draft = proposal.drafts
            num_drafted = draft.num_tokens
            width_k = draft.tokens.shape[1]
            if width_k:
                columns = np.minimum(position[active, None] + np.arange(width_k)[None, :], width)
                truth = responses[active[:, None], columns]
                valid = np.arange(width_k)[None, :] < num_drafted[:, None]
                matches = (draft.tokens == truth) & valid
                accepted = np.cumprod(matches, axis=1).sum(axis=1)
        produced = np.minimum(accepted + 1, lengths[active] - position[active])
        iteration_tokens.append(int((1 + num_drafted).sum()))
        # KV tokens the iteration attends to: every verified token reads its request's context.
        context = prompt_lengths[active] + position[active]
        iteration_context.append(int(((1 + num_drafted) * context).sum()))
        iteration_drafts.append(int(num_drafted.sum()))
        modelled += cost.step_time(
            iteration_tokens[-1], iteration_context[-1], iteration_drafts[-1]
        )
        passes += 1
        request_passes += active.size
        draft_tokens += int(num_drafted.sum())
        accepted_tokens += int(np.minimum(accepted, produced).sum())
        if drafter is not None:
            started = time.perf_counter()
            drafter.extend_many(
                active.tolist(),
                [
                    responses[row, position[row] : position[row] + n].astype(np.int32)
                    for row, n in zip(active, produced, strict=True)
                ],
            )
            drafter_s += time.perf_counter() - started
        position[active] += produced
        done = active[position[active] >= lengths[active]]
        if drafter is not None and done.size:
            started = time.perf_counter()
            for row in done:
                drafter.finish_request(int(row), records[row].finish_reason)
            drafter_s += time.perf_counter() - started
        active = active[position[active] < lengths[active]]
    output_tokens = int(lengths.sum())
    return StepResult(
        step=step,
        num_requests=num,
        forward_passes=int(passes),
        modelled_s=float(modelled),
        output_tokens=output_tokens,
        draft_tokens=draft_tokens,
        accepted_tokens=accepted_tokens,
        mean_accepted_len=output_tokens / max(1, request_passes),
        drafter_s=drafter_s,
        iteration_tokens=np.array(iteration_tokens, dtype=np.int64),
        iteration_context_tokens=np.array(iteration_context, dtype=np.int64),
        iteration_draft_tokens=np.array(iteration_drafts, dtype=np.int64),
    )


def replay_trace(
    steps: Mapping[int, Sequence[RolloutRecord]],
    drafter: Drafter | None,
    cost: StepCostModel,
) -> list[StepResult]:
    """Replay every step in order with one drafter, whose history carries across steps."""
    return [replay_step(step, steps[step], drafter, cost) for step in sorted(steps)]
