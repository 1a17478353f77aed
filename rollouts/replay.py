"""Offline replay: run a recorded multi-step trace through a drafter as an engine would.

Each step's rollouts go through a model of vLLM's continuous-batching scheduler:

* At most ``max_num_seqs`` requests run at once; the rest wait in record order (vLLM's FCFS
  waiting queue) and each starts in the iteration after a running request finishes.
* A request's prompt is prefilled in the iteration it starts (its ``prefill_tokens``), which
  also samples its first response token, without a draft (drafts are proposed after a step
  for the next one, as vLLM's proposers do).
* In every later iteration the request decodes: it gets a draft, whose tokens are accepted
  while they equal the recorded response (the greedy-acceptance model of the recorded output),
  then the target's own next token is added, so its forward pass yields ``accepted + 1``
  tokens. Its context is its prompt plus the tokens it generated so far.

Chunked prefill's token budget (``max_num_batched_tokens``), preemption and prefix caching are
not modelled. Each iteration is described by its :class:`~policies.step_shapes.StepShapes` row;
a step's modelled time is ``cost.times(shapes).sum()``, so one replay can be priced under any
cost model (:meth:`StepResult.modelled_under`) without running the drafter again.

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

from policies.step_shapes import StepShapes
from rollouts.trace import RolloutRecord

logger = logging.getLogger(__name__)

# vLLM 0.32's default max_num_seqs (vllm/engine/arg_utils.py,
# EngineArgs.get_batch_defaults, used when the engine is built without one): 1024 on a GPU of
# >= 70 GiB other than an A100 (H100, H200, B200) for both the LLM class and the OpenAI server;
# 256 on other GPUs; 256 x world size on a CPU for the LLM class (128 x world size for the
# OpenAI server). The replay's default is the GPU one: RL rollouts run on H100-class GPUs.
VLLM_GPU_MAX_NUM_SEQS = 1024
VLLM_CPU_MAX_NUM_SEQS = 256


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


class CostModel(Protocol):
    """Anything that prices engine steps from their shapes (``StepCostModel``, tables)."""

    def times(self, shapes: StepShapes) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """How the modelled engine schedules a step's rollouts.

    Attributes:
        max_num_seqs: most requests running at once (vLLM's ``max_num_seqs``); default
            :data:`VLLM_GPU_MAX_NUM_SEQS`, vLLM 0.32's default on an H100-class GPU
            (:data:`VLLM_CPU_MAX_NUM_SEQS` on a CPU).
    """

    max_num_seqs: int = VLLM_GPU_MAX_NUM_SEQS

    def __post_init__(self) -> None:
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int):
            raise ValueError(f"max_num_seqs={self.max_num_seqs!r} must be an int")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")


@dataclass(frozen=True, slots=True)
class StepResult:
    """One replayed step of one method."""

    step: int
    num_requests: int
    forward_passes: int  # iterations until the last request finished (the makespan)
    modelled_s: float
    output_tokens: int
    draft_tokens: int
    accepted_tokens: int
    mean_accepted_len: float  # tokens per request per forward pass (1 = no speculation gain)
    drafter_s: float  # wall time spent inside the drafter
    # One row per iteration (forward pass), to price the step under any cost model.
    shapes: StepShapes

    @property
    def wasted_draft_tokens(self) -> int:
        return self.draft_tokens - self.accepted_tokens

    def modelled_under(self, cost: CostModel) -> StepResult:
        """The same step with its time modelled by another cost model (passes are unchanged)."""
        return dataclasses.replace(self, modelled_s=float(cost.times(self.shapes).sum()))

    def to_dict(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del row["shapes"]
        return {**row, "wasted_draft_tokens": self.wasted_draft_tokens}


_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(StepShapes))


class _Timer:
    """Wall time spent inside the drafter, summed over calls."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


def replay_step(
    step: int,
    records: Sequence[RolloutRecord],
    drafter: Drafter | None,
    cost: CostModel,
    config: ReplayConfig | None = None,
) -> StepResult:
    """Replay one step's rollouts through the modelled engine; ``drafter=None``: no
    speculation. Request ids given to the drafter are the rows of ``records``."""
    config = config or ReplayConfig()
    num = len(records)
    lengths = np.fromiter((r.num_response_tokens for r in records), np.int64, num)
    prompt_lengths = np.fromiter((r.num_prompt_tokens for r in records), np.int64, num)
    width = int(lengths.max(initial=0))
    # One padding column of -1: draft positions past a response's end read it and never match.
    responses = np.full((num, width + 1), -1, dtype=np.int32)
    for i, record in enumerate(records):
        responses[i, : lengths[i]] = record.response_tokens
    timer = _Timer()
    if drafter is not None:
        started = time.perf_counter()
        drafter.begin_step(step)
        timer.seconds += time.perf_counter() - started

    position = np.zeros(num, dtype=np.int64)  # response tokens produced so far
    running = np.zeros(0, dtype=np.int64)  # rows decoding, in the order they started
    num_started = 0  # rows [0, num_started) have started (FCFS)
    columns: dict[str, list[int]] = {name: [] for name in _SHAPE_FIELDS}
    draft_tokens = accepted_tokens = request_passes = 0
    while running.size or num_started < num:
        # Admission: free slots go to the waiting requests in order; a slot freed by a request
        # that finished in the previous iteration is taken in this one.
        num_new = min(config.max_num_seqs - running.size, num - num_started)
        new = np.arange(num_started, num_started + num_new, dtype=np.int64)
        num_started += num_new
        if drafter is not None and num_new:
            started = time.perf_counter()
            for row in new.tolist():
                record = records[row]
                drafter.start_request(row, record.prompt_tokens, record.prompt_key)
            timer.seconds += time.perf_counter() - started

        num_drafted, accepted = _draft_and_verify(drafter, running, position, responses, timer)
        remaining = lengths[running] - position[running]
        produced = np.minimum(accepted + 1, remaining)
        # Context each decoding request attends to: its prompt and its tokens so far.
        context = prompt_lengths[running] + position[running]
        verified = 1 + num_drafted
        columns["num_tokens"].append(int(verified.sum()))
        columns["draft_tokens"].append(int(num_drafted.sum()))
        columns["num_requests"].append(int(running.size))
        columns["kv_tokens"].append(int(context.sum()))
        columns["context_tokens"].append(int((verified * context).sum()))
        columns["prefill_tokens"].append(int(prompt_lengths[new].sum()))
        request_passes += running.size + num_new
        draft_tokens += columns["draft_tokens"][-1]
        accepted_tokens += int(np.minimum(accepted, produced).sum())

        # The prefill samples each new request's first token (none for an empty response).
        advancing = np.concatenate([running, new])
        produced = np.concatenate([produced, np.minimum(lengths[new], 1)])
        if drafter is not None:
            started = time.perf_counter()
            starts = position[advancing].tolist()
            drafter.extend_many(
                advancing.tolist(),
                [
                    responses[row, start : start + n]
                    for row, start, n in zip(
                        advancing.tolist(), starts, produced.tolist(), strict=True
                    )
                ],
            )
            timer.seconds += time.perf_counter() - started
        position[advancing] += produced
        unfinished = position[advancing] < lengths[advancing]
        if drafter is not None and not unfinished.all():
            started = time.perf_counter()
            for row in advancing[~unfinished].tolist():
                drafter.finish_request(row, records[row].finish_reason)
            timer.seconds += time.perf_counter() - started
        running = advancing[unfinished]
    output_tokens = int(lengths.sum())
    shapes = StepShapes(**{name: np.array(values, np.int64) for name, values in columns.items()})
    return StepResult(
        step=step,
        num_requests=num,
        forward_passes=len(shapes),
        modelled_s=float(cost.times(shapes).sum()),
        output_tokens=output_tokens,
        draft_tokens=draft_tokens,
        accepted_tokens=accepted_tokens,
        mean_accepted_len=output_tokens / max(1, request_passes),
        drafter_s=timer.seconds,
        shapes=shapes,
    )


def _draft_and_verify(
    drafter: Drafter | None,
    rows: np.ndarray,
    position: np.ndarray,
    responses: np.ndarray,
    timer: _Timer,
) -> tuple[np.ndarray, np.ndarray]:
    """Draft lengths and accepted draft tokens of the decoding ``rows`` (zeros without a
    drafter): the longest prefix of each draft that equals the recorded continuation."""
    zeros = np.zeros(rows.size, dtype=np.int64)
    if drafter is None or not rows.size:
        return zeros, zeros
    started = time.perf_counter()
    draft = drafter.propose(rows.tolist()).drafts
    timer.seconds += time.perf_counter() - started
    num_drafted = np.asarray(draft.num_tokens, dtype=np.int64)
    width_k = draft.tokens.shape[1]
    if not width_k or not num_drafted.any():
        return num_drafted, zeros
    last_column = responses.shape[1] - 1  # the -1 padding column
    columns = np.minimum(position[rows, None] + np.arange(width_k)[None, :], last_column)
    truth = responses[rows[:, None], columns]
    matches = (draft.tokens == truth) & (np.arange(width_k)[None, :] < num_drafted[:, None])
    return num_drafted, np.cumprod(matches, axis=1).sum(axis=1)


def replay_trace(
    steps: Mapping[int, Sequence[RolloutRecord]],
    drafter: Drafter | None,
    cost: CostModel,
    config: ReplayConfig | None = None,
) -> list[StepResult]:
    """Replay every step in order with one drafter, whose history carries across steps."""
    return [replay_step(step, steps[step], drafter, cost, config) for step in sorted(steps)]
