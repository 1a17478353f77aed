"""The offline replay simulator and the n-gram baseline."""

from __future__ import annotations

import numpy as np

from das.drafter import Proposal
from das.methods import METHODS, build_drafter
from das.ngram import NgramDrafter
from policies.cost_model import StepCostModel
from rollouts.replay import replay_step, replay_trace
from rollouts.trace import RolloutRecord, prompt_key_for
from suffix_tree.draft import DraftBatch

COST = StepCostModel(c_base=0.01, c_tok=1e-4, knee_tokens=8)


def record(prompt: list[int], response: list[int], step: int = 1, sample: int = 0) -> RolloutRecord:
    prompt_array = np.array(prompt, np.int32)
    return RolloutRecord(
        prompt_key=prompt_key_for(prompt_array),
        step=step,
        sample_index=sample,
        prompt_tokens=prompt_array,
        response_tokens=np.array(response, np.int32),
        finish_reason="stop",
        prompt_index=0,
        wall_s=0.0,
    )


class TruthDrafter:
    """Test double that knows each response and proposes its next k tokens exactly."""

    def __init__(self, responses: list[list[int]], k: int) -> None:
        self.responses, self.k, self.position = responses, k, {}

    def begin_step(self, step=None):
        pass

    def start_request(self, request_id, prompt_tokens, prompt_key=None):
        self.position[request_id] = 0

    def propose(self, request_ids) -> Proposal:
        tokens = np.zeros((len(request_ids), self.k), np.int32)
        num = np.zeros(len(request_ids), np.int64)
        for row, rid in enumerate(request_ids):
            rest = self.responses[rid][self.position[rid] : self.position[rid] + self.k]
            tokens[row, : len(rest)] = rest
            num[row] = len(rest)
        batch = DraftBatch(tokens, np.ones(tokens.shape), num, num * 1.0, num)
        return Proposal(batch, np.zeros(len(request_ids), np.int8), num)

    def extend_many(self, request_ids, tokens):
        for rid, chunk in zip(request_ids, tokens, strict=True):
            self.position[rid] += len(chunk)

    def finish_request(self, request_id, finish_reason, stop_token_ids=()):
        pass


def test_no_speculation_takes_one_pass_per_token_of_the_longest_response():
    records = [record([1], list(range(7))), record([2], list(range(3)))]
    result = replay_step(1, records, None, COST)
    assert result.forward_passes == 7
    assert result.output_tokens == 10
    assert result.mean_accepted_len == 1.0
    # Modelled time: 3 passes with 2 requests, then 4 with 1 (all below the knee).
    assert result.modelled_s == 7 * COST.c_base


def test_a_perfect_drafter_needs_one_pass_per_k_plus_one_tokens():
    responses = [list(range(100, 123)), list(range(200, 205))]
    records = [record([1], responses[0]), record([2], responses[1])]
    result = replay_step(1, records, TruthDrafter(responses, k=4), COST)
    assert result.forward_passes == int(np.ceil(23 / 5))
    assert result.output_tokens == 28
    # Accepted drafts can never exceed what was produced beyond the bonus tokens.
    assert result.accepted_tokens <= result.output_tokens - result.forward_passes
    assert result.draft_tokens >= result.accepted_tokens


def test_das_learns_from_the_previous_step_of_the_same_prompt():
    rng = np.random.default_rng(0)
    responses = [rng.integers(0, 500, size=60).tolist() for _ in range(4)]
    steps = {
        step: [record([i, i + 1], r, step=step) for i, r in enumerate(responses)] for step in (1, 2)
    }
    none = replay_trace(steps, None, COST)
    das = replay_trace(steps, build_drafter("das_fixed", COST, num_speculative_tokens=8), COST)
    assert none[1].forward_passes == 60
    # Step 2 repeats step 1, so the prompt trees predict it and passes drop several-fold.
    assert das[1].forward_passes < 60 / 3
    assert das[1].output_tokens == none[1].output_tokens


def test_every_method_replays_and_produces_the_same_tokens():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 50, size=40)
    steps = {
        step: [record([s, 9], base[: 20 + s].tolist(), step=step, sample=s) for s in range(4)]
        for step in (1, 2, 3)
    }
    totals = set()
    for method in METHODS:
        results = replay_trace(steps, build_drafter(method, COST, num_speculative_tokens=4), COST)
        totals.add(tuple(r.output_tokens for r in results))
        assert all(r.accepted_tokens <= r.draft_tokens for r in results)
    assert len(totals) == 1


def test_ngram_drafts_the_continuation_of_the_most_recent_match():
    drafter = NgramDrafter(num_speculative_tokens=3, min_n=2, max_n=3)
    drafter.start_request(0, [5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6])
    # Last 3 tokens [4, 5, 6] do not occur earlier; [5, 6] does, most recently before 9.
    assert drafter.propose([0]).draft_tokens() == [[9, 4, 5]]
    drafter.start_request(1, [1, 2, 3])
    assert drafter.propose([1]).draft_tokens() == [[]]
