"""Replay helpers that know the trace: what only an offline replay can tell a drafter.

:class:`TraceView` wraps a drafter for :func:`rollouts.replay.replay_step` and knows each
request's recorded response, so it can give a policy true remaining lengths and cut drafts to
what the trace accepts; :class:`OracleSourceDrafter` verifies, per request, the source whose
draft the trace accepts furthest, and :class:`OracleTreeDrafter` verifies, from each source,
whatever its tree holds of what the trace produces next (the ceiling of tree-shaped drafts).
The policy-ceiling and source-choice benchmarks build on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from das.drafter import DASDrafter
from policies.budget import BatchView
from rollouts.trace import RolloutRecord
from suffix_tree.draft import DraftBatch

__all__ = [
    "OracleSourceDrafter",
    "OracleTreeDrafter",
    "TraceView",
    "accepted_per_source",
    "truth_matrix",
]


def truth_matrix(
    truths: Sequence[np.ndarray], width: int, fill: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` tokens of each row's truth as an int32 matrix [rows, width]
    (``fill`` past a row's length), and each row's length (at most ``width``)."""
    matrix = np.full((len(truths), width), fill, np.int32)
    lengths = np.zeros(len(truths), np.int64)
    for row, tokens in enumerate(truths):
        lengths[row] = min(width, tokens.size)
        matrix[row, : lengths[row]] = tokens[: lengths[row]]
    return matrix, lengths


def accepted_per_source(
    batches: Sequence[DraftBatch | None], truths: Sequence[np.ndarray]
) -> np.ndarray:
    """[sources, rows] how many leading tokens of each source's draft ``truths`` accepts
    (``truths[row]``: the tokens row ``row`` has still to generate); -1 for a disabled source."""
    rows = len(truths)
    width = max((b.tokens.shape[1] for b in batches if b is not None), default=0)
    truth, _ = truth_matrix(truths, width, fill=-1)  # -1: equals no draft token
    accepted = np.full((len(batches), rows), -1, np.int64)
    for source, batch in enumerate(batches):
        if batch is None:
            continue
        columns = np.arange(batch.tokens.shape[1])[None, :]
        agree = (batch.tokens == truth[:, : batch.tokens.shape[1]]) & (
            columns < batch.num_tokens[:, None]
        )
        accepted[source] = np.cumprod(agree, axis=1).sum(axis=1)
    return accepted


class OracleSourceDrafter(DASDrafter):
    """A DAS drafter that verifies, per request, the source's draft that ``truths`` accepts
    furthest (ties: the best calibrated score). ``truths[row]`` holds the recorded tokens each
    row of the next :meth:`propose` has still to generate; :class:`TraceView` sets it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.truths: list[np.ndarray] = []

    def _choose_sources(self, batches: list[DraftBatch | None], scores: np.ndarray) -> np.ndarray:
        accepted = accepted_per_source(batches, self.truths)
        # A calibrated score is a sum of at most K probabilities, below K + 1.
        width_of_score = scores.max(initial=0.0) + 2.0
        return np.argmax(accepted * width_of_score + scores, axis=0)


class OracleTreeDrafter(OracleSourceDrafter):
    """:class:`OracleSourceDrafter` whose drafts are, per source, the longest prefix of
    ``truths[row]`` that the source's tree holds after some suffix of the context
    (:meth:`suffix_tree.SuffixForest.known_continuations`), within the bounds of a draft from
    that match. A greedy draft follows the most frequent branch; a tree-shaped draft may hold
    several; this one holds, in hindsight, the branch the target takes: the furthest any draft
    from the three trees could be accepted, whatever its shape and however many branches a
    pass verified. Each draft token's probability is set to 1."""

    def _look_up(
        self,
        requests: list[Any],
        context_slots: np.ndarray,
        caps: np.ndarray,
        spec_factor: float,
    ) -> DraftBatch:
        drafts = super()._look_up(requests, context_slots, caps, spec_factor)
        roots, match_slots = self._lookup_trees(requests, context_slots)
        sources = len(self._enabled_sources)
        truth, truth_lens = truth_matrix(self.truths, drafts.tokens.shape[1])
        lengths, matches = self.forest.known_continuations(
            roots,
            np.tile(context_slots, sources),
            np.tile(truth, (sources, 1)),
            np.tile(truth_lens, sources),
            np.tile(caps, sources),
            max_spec_factor=spec_factor,
            match_slots=match_slots,
        )
        return DraftBatch(
            np.tile(truth, (sources, 1)),
            np.ones(drafts.probs.shape),
            lengths,
            lengths.astype(np.float64),
            matches,
        )


class TraceView:
    """A drafter wrapper that knows the step's recorded responses (which only a replay has).

    It tells a policy each request's true remaining length (:meth:`remaining`), counts each
    request's forward passes and rejected draft tokens, and with ``cut_drafts`` cuts every
    draft to the prefix the trace accepts: the drafts a policy that knew acceptance in advance
    would verify. Request ids are the row indices ``replay_step`` gives; call :meth:`set_step`
    before each step.
    """

    def __init__(self, drafter: DASDrafter, cut_drafts: bool = False) -> None:
        self.drafter = drafter
        self.cut_drafts = cut_drafts
        self.responses: list[np.ndarray] = []
        self.generated: dict[Hashable, int] = {}
        self.passes: dict[Hashable, int] = {}
        self.rejected: dict[Hashable, int] = {}  # draft tokens verified and rejected, per request
        self.current = np.zeros(0)

    def set_step(self, records: Sequence[RolloutRecord]) -> None:
        self.responses = [np.asarray(r.response_tokens) for r in records]

    def remaining(self, batch: BatchView) -> np.ndarray:
        return self.current

    def begin_step(self, step: int | None = None) -> int:
        self.generated.clear()
        self.passes.clear()
        self.rejected.clear()
        return self.drafter.begin_step(step)

    def start_request(self, request_id: Hashable, prompt_tokens: Any, prompt_key: Any = None):
        self.generated[request_id] = 0
        self.passes[request_id] = 0
        self.rejected[request_id] = 0
        return self.drafter.start_request(request_id, prompt_tokens, prompt_key)

    def propose(self, request_ids: Sequence[Hashable]) -> Any:
        truths = [self.responses[i][self.generated[i] :] for i in request_ids]
        self.current = np.array([truth.size for truth in truths], dtype=np.float64)
        for request_id in request_ids:
            self.passes[request_id] += 1
        if hasattr(self.drafter, "truths"):  # a drafter that scores against the trace
            self.drafter.truths = truths
        proposal = self.drafter.propose(request_ids)
        # What the replay accepts: the draft's prefix that equals the rest of the response.
        accepted = accepted_per_source([proposal.drafts], truths)[0]
        if self.cut_drafts:
            cut = dataclasses.replace(proposal.drafts, num_tokens=accepted)
            budgets = np.minimum(proposal.budgets, accepted)
            proposal = dataclasses.replace(proposal, drafts=cut, budgets=budgets)
        rejected = proposal.drafts.num_tokens - accepted
        for request_id, count in zip(request_ids, rejected.tolist(), strict=True):
            self.rejected[request_id] += count
        return proposal

    def extend_many(self, request_ids: Sequence[Hashable], tokens: Sequence[np.ndarray]) -> None:
        for request_id, produced in zip(request_ids, tokens, strict=True):
            self.generated[request_id] += len(produced)
        self.drafter.extend_many(request_ids, tokens)

    def finish_request(
        self, request_id: Hashable, finish_reason: str, stop_token_ids: Iterable[int] = ()
    ) -> None:
        self.drafter.finish_request(request_id, finish_reason, stop_token_ids)
