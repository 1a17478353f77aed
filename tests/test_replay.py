"""The offline replay simulator and the n-gram baseline."""

from __future__ import annotations

import numpy as np
import pytest

from das.drafter import Proposal
from das.methods import METHODS, build_drafter
from das.ngram import NgramDrafter
from policies.cost_model import StepCostModel
from rollouts.replay import ReplayConfig, replay_step, replay_trace
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


class WrongDrafter(TruthDrafter):
    """Test double that always proposes k tokens no response holds."""

    def propose(self, request_ids) -> Proposal:
        tokens = np.full((len(request_ids), self.k), 9999, np.int32)
        num = np.full(len(request_ids), self.k, np.int64)
        batch = DraftBatch(tokens, np.ones(tokens.shape), num, num * 1.0, num)
        return Proposal(batch, np.zeros(len(request_ids), np.int8), num)


def test_no_speculation_takes_one_pass_per_token_of_the_longest_response():
    records = [record([1], list(range(7))), record([2], list(range(3)))]
    result = replay_step(1, records, None, COST)
    # The prefill pass samples each response's first token, then one pass per token.
    assert result.forward_passes == 7
    assert result.output_tokens == 10
    assert result.mean_accepted_len == 1.0
    # Modelled time: 7 passes, all below the knee.
    assert result.modelled_s == pytest.approx(7 * COST.c_base)


def test_a_truth_drafter_cuts_passes_and_a_wrong_one_accepts_nothing():
    responses = [list(range(100, 123)), list(range(200, 205))]
    records = [record([1], responses[0]), record([2], responses[1], sample=1)]
    plain = replay_step(1, records, None, COST)
    assert plain.forward_passes == 23
    truth = replay_step(1, records, TruthDrafter(responses, k=4), COST)
    # The prefill pass gives token 1 undrafted; every later pass verifies 4 true draft tokens
    # and adds one: 1 + ceil(22 / 5) = 6 passes for the 23-token response.
    assert truth.forward_passes == 1 + int(np.ceil(22 / 5))
    assert truth.output_tokens == 28
    # After its first token, the 5-token response takes 1 pass (its 4 drafts accepted); the
    # 23-token one takes 5: four of 4 accepted + 1 own token, then the last 2 tokens accepted.
    assert truth.accepted_tokens == 4 + (4 * 4 + 2)
    wrong = replay_step(1, records, WrongDrafter(responses, k=4), COST)
    assert wrong.accepted_tokens == 0
    assert wrong.forward_passes == plain.forward_passes
    np.testing.assert_array_equal(wrong.shapes.num_requests, plain.shapes.num_requests)
    # The wrong drafts are still verified: 4 more tokens per decoding request per pass.
    np.testing.assert_array_equal(
        wrong.shapes.num_tokens, plain.shapes.num_tokens + 4 * plain.shapes.num_requests
    )


def test_a_cap_on_running_requests_makes_the_rest_wait():
    # 7 requests of 5 tokens, at most 3 running: three waves of 5 passes each.
    records = [record([i] * (i + 1), [7, 8, 9, 10, 11], sample=i) for i in range(7)]
    result = replay_step(1, records, None, COST, ReplayConfig(max_num_seqs=3))
    assert result.forward_passes == int(np.ceil(7 / 3)) * 5
    # Requests 0-2 start in pass 0 and finish in pass 4; 3-5 start in pass 5, 6 in pass 10.
    # Prompt i has i + 1 tokens, so each pass's prefill names the requests that started in it.
    expected_prefill = np.zeros(15, np.int64)
    expected_prefill[0] = 1 + 2 + 3
    expected_prefill[5] = 4 + 5 + 6
    expected_prefill[10] = 7
    np.testing.assert_array_equal(result.shapes.prefill_tokens, expected_prefill)
    assert result.shapes.num_requests.max() == 3
    unbounded = replay_step(1, records, None, COST, ReplayConfig(max_num_seqs=7))
    assert unbounded.forward_passes == 5


def test_prefill_is_charged_once_in_the_pass_a_request_starts():
    responses = [list(range(10, 16)), list(range(20, 22)), list(range(30, 34))]
    prompts = [[1, 2], [3, 4, 5], [6] * 10]
    records = [
        record(p, r, sample=i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    result = replay_step(1, records, TruthDrafter(responses, k=2), COST, ReplayConfig(2))
    # Pass 0 prefills requests 0 and 1 (2 + 3 prompt tokens). In pass 1 both decode; request
    # 1 takes its last token and ends, so request 2 starts (10 prompt tokens) in pass 2, where
    # request 0 (3 tokens a pass: 1 + 3 + 2) ends; request 2 decodes its last 3 in pass 3.
    np.testing.assert_array_equal(result.shapes.prefill_tokens, [5, 0, 10, 0])
    np.testing.assert_array_equal(result.shapes.num_requests, [0, 2, 1, 1])


def test_kv_and_context_tokens_are_each_requests_prompt_plus_its_tokens_so_far():
    records = [record([1, 2], [5, 6, 7]), record([3, 4, 5], [8, 9], sample=1)]
    plain = replay_step(1, records, None, COST)
    # Pass 0: prefill only. Pass 1: both decode with 1 token so far: (2 + 1) + (3 + 1).
    # Pass 2: the 2-token response is done; the other has 2 tokens: 2 + 2.
    np.testing.assert_array_equal(plain.shapes.kv_tokens, [0, 7, 4])
    np.testing.assert_array_equal(plain.shapes.context_tokens, [0, 7, 4])
    wrong = replay_step(1, records, WrongDrafter([[5, 6, 7], [8, 9]], k=3), COST)
    np.testing.assert_array_equal(wrong.shapes.kv_tokens, [0, 7, 4])
    # Every verified token (1 + 3 drafts) attends to its request's context.
    np.testing.assert_array_equal(wrong.shapes.context_tokens, [0, 4 * 7, 4 * 4])
    np.testing.assert_array_equal(wrong.shapes.draft_tokens, [0, 6, 3])


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


def test_every_method_replays_within_the_bounds_of_greedy_acceptance():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 50, size=40)
    steps = {
        step: [record([s, 9], base[: 20 + s].tolist(), step=step, sample=s) for s in range(4)]
        for step in (1, 2, 3)
    }
    plain = replay_trace(steps, None, COST)
    for method in METHODS:
        results = replay_trace(steps, build_drafter(method, COST, num_speculative_tokens=4), COST)
        for result, base_result in zip(results, plain, strict=True):
            assert result.accepted_tokens <= result.draft_tokens
            # A pass can never yield more than k + 1 tokens of a request, nor fewer than one.
            assert base_result.forward_passes >= result.forward_passes
            assert result.forward_passes >= 1 + int(np.ceil((20 + 3 - 1) / 5))


def test_ngram_drafts_the_continuation_of_the_most_recent_match():
    drafter = NgramDrafter(num_speculative_tokens=3, min_n=2, max_n=3)
    drafter.start_request(0, [5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6])
    # Last 3 tokens [4, 5, 6] do not occur earlier; [5, 6] does, most recently before 9.
    assert drafter.propose([0]).draft_tokens() == [[9, 4, 5]]
    drafter.start_request(1, [1, 2, 3])
    assert drafter.propose([1]).draft_tokens() == [[]]
