"""What tree-shaped drafts would give in a replay: several branches per request, one pass.

vLLM 0.32 verifies one linear draft per request (its proposer seam takes a list of token ids
per request, and this version has no token-tree attention), so no engine runs DAS's drafts as
trees. This module measures, in a replay, what verifying trees would be worth.

:class:`TreeDraftDrafter` is DAS's cost-model drafter (same trees, same history) that, in
batches of at most ``max_tree_batch`` requests, drafts a tree per request instead of a path:
from the source the linear drafter's calibrated scores choose (its :meth:`propose` runs, and
learns from what the target produced as if its path had been verified), the most probable
positions below the best match (:meth:`suffix_tree.SuffixForest.tree_drafts`), and per request
as many of them (best first) as :func:`policies.budget.optimal_budgets` gives, that is as the
cost-model policy budgets linear drafts: expected tokens per second of the step, every
verified node priced as a token. The positions' probabilities are scaled by one factor learnt
online (accepted tokens over expected, over the tree passes so far). Larger batches get the
cost-model policy's linear drafts.

A pass that verifies a tree accepts its longest path that the target produces. The replay
accepts the leading tokens of a draft that equal the recorded response, so the drafter hands
it, per request, that path (the recorded tokens it knows from the trace view) followed by one
token that differs, with the draft length set to the tree's node count: the replay then accepts
what the tree would and prices every node. The recorded tokens never shape a tree.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from das.bench.trace_oracle import truth_matrix
from das.drafter import SOURCES, DASDrafter, Proposal
from policies.budget import optimal_budgets
from suffix_tree.draft import DraftBatch

__all__ = ["TreeDraftDrafter"]

# The factor's prior: as if the first tree passes had accepted half their expected tokens.
PRIOR_EXPECTED_TOKENS = 64.0
PRIOR_ACCEPTED_TOKENS = 32.0


class TreeDraftDrafter(DASDrafter):
    """DAS's cost-model drafter drafting trees in small batches (see the module doc).

    ``max_nodes``: the most nodes of one request's tree; ``max_tree_batch``: the largest batch
    that drafts trees; ``merge_matches``: the tree holds the most probable paths below every
    match of the context instead of below the best one
    (:meth:`suffix_tree.SuffixForest.tree_drafts`). ``truths[row]`` holds the recorded tokens
    each row of the next :meth:`propose` has still to generate
    (:class:`das.bench.trace_oracle.TraceView` sets it).
    """

    def __init__(
        self,
        *args: Any,
        max_nodes: int = 16,
        max_tree_batch: int = 32,
        merge_matches: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.policy is None or self.cost is None:
            raise ValueError("TreeDraftDrafter needs a budget policy and its step cost model")
        self.max_nodes = max_nodes
        self.max_tree_batch = max_tree_batch
        self.merge_matches = merge_matches
        self.truths: list[np.ndarray] = []
        self.expected_tokens = PRIOR_EXPECTED_TOKENS
        self.accepted_tokens = PRIOR_ACCEPTED_TOKENS
        self.tree_passes = 0
        self._expected_of: dict[Hashable, float] = {}

    @property
    def acceptance_factor(self) -> float:
        """Accepted draft tokens over the tree probabilities' expectation, so far."""
        return self.accepted_tokens / self.expected_tokens

    def propose(
        self, request_ids: Sequence[Hashable], max_tokens: np.ndarray | int | None = None
    ) -> Proposal:
        rows = len(request_ids)
        if not rows or rows > self.max_tree_batch:
            return super().propose(request_ids, max_tokens)
        self.tree_passes += 1
        requests = [self._request(rid) for rid in request_ids]
        context_slots = np.fromiter((r.own_slot for r in requests), np.int64, rows)
        roots, match_slots = self._lookup_trees(requests, context_slots)
        k = self.config.num_speculative_tokens
        truth, truth_lens = truth_matrix(self.truths, k + 1)
        sources = len(self._enabled_sources)
        cumulative, accepted, num, matches = self.forest.tree_drafts(
            roots,
            np.tile(context_slots, sources),
            np.tile(truth, (sources, 1)),
            np.tile(truth_lens, sources),
            self.max_nodes,
            k,
            max_spec_factor=self.config.spec_factor_for(self.cost.knee_tokens),
            match_slots=match_slots,
            merge_matches=self.merge_matches,
        )
        # Per request, the source the linear drafter's calibrated scores choose; where it
        # drafts nothing, the source whose tree's probabilities sum highest (first on ties).
        best = np.argmax(cumulative.sum(axis=1).reshape(sources, rows), axis=0)
        linear = super().propose(request_ids, max_tokens).sources
        position = np.full(len(SOURCES), -1)
        position[self._enabled_sources] = np.arange(sources)
        best = np.where(linear >= 0, position[np.maximum(linear, 0)], best)
        chosen = best * rows + np.arange(rows)
        # Scaled by the learnt factor, capped at 1 (a factor above 1: trees accepted more than
        # their counts said); the cap keeps each row non-increasing.
        values = np.minimum(cumulative[chosen] * self.acceptance_factor, 1.0)
        shape = self._batch_view(requests, values)
        budgets = optimal_budgets(
            list(values),
            self.cost,
            context_tokens=shape.context_tokens.astype(np.float64),
            min_relative_gain=0.02,
        )
        budgets = np.minimum(budgets, num[chosen])
        held = np.where(
            budgets > 0, accepted[chosen, np.maximum(budgets - 1, 0)], 0
        )  # what a pass verifying the first `budgets` nodes accepts
        tokens = truth.copy()
        # One token past the accepted path that differs from the recorded one ends acceptance.
        tokens[np.arange(rows), held] = np.where(
            held < truth_lens, truth[np.arange(rows), held] + 1, 0
        )
        for row, rid in enumerate(request_ids):
            self._expected_of[rid] = float(cumulative[chosen[row], : budgets[row]].sum())
        drafts = DraftBatch(
            tokens,
            np.ones((rows, k + 1)),
            budgets.astype(np.int64),
            np.zeros(rows),
            matches[chosen],
        )
        picked = np.asarray(self._enabled_sources)[best]  # indices into das.drafter.SOURCES
        return Proposal(drafts, np.where(budgets > 0, picked, -1).astype(np.int8), budgets)

    def extend_many(self, request_ids: Sequence[Hashable], tokens: Sequence[np.ndarray]) -> None:
        for request_id, produced in zip(request_ids, tokens, strict=True):
            expected = self._expected_of.pop(request_id, None)
            if expected:
                self.expected_tokens += expected
                self.accepted_tokens += max(0, len(produced) - 1)
        super().extend_many(request_ids, tokens)
