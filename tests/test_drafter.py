"""The DAS drafter's lifecycle, sources, history window and failure fallback."""

from __future__ import annotations

import numpy as np
import pytest

from das.config import DASConfig
from das.drafter import SOURCES, DASDrafter
from policies.budget import BatchView, BudgetPolicy
from policies.cost_model import StepCostModel

PROMPT_A = [101, 102, 103]
PROMPT_B = [201, 202, 203]
RESPONSE = list(range(10, 40))  # 30 distinct tokens


def prompt_only(**overrides) -> DASConfig:
    settings = {"use_global_tree": False, "use_own_context": False, "calibrate": False}
    return DASConfig(**{**settings, **overrides})


def run_request(drafter: DASDrafter, rid, prompt, response, reason="stop") -> None:
    drafter.start_request(rid, prompt)
    drafter.extend_request(rid, response)
    drafter.finish_request(rid, reason)


def test_history_of_the_same_prompt_drafts_the_next_step():
    drafter = DASDrafter(prompt_only(num_speculative_tokens=4))
    drafter.begin_step(1)
    run_request(drafter, "r1", PROMPT_A, RESPONSE)
    drafter.begin_step(2)
    drafter.start_request("a", PROMPT_A)
    drafter.start_request("b", PROMPT_B)
    drafter.extend_many(["a", "b"], [RESPONSE[:5], RESPONSE[:5]])
    proposal = drafter.propose(["a", "b"])
    # Prompt A's tree holds last step's response: it continues with the next 4 tokens.
    assert proposal.draft_tokens()[0] == RESPONSE[5:9]
    assert SOURCES[proposal.sources[0]] == "prompt"
    # Prompt B has no history, and no other source is enabled.
    assert proposal.draft_tokens()[1] == []
    assert proposal.sources[1] == -1


def test_batches_larger_than_max_draft_batch_get_no_drafts():
    drafter = DASDrafter(prompt_only(num_speculative_tokens=4, max_draft_batch=2))
    drafter.begin_step(1)
    run_request(drafter, "r1", PROMPT_A, RESPONSE)
    drafter.begin_step(2)
    for rid in "abc":
        drafter.start_request(rid, PROMPT_A)
    drafter.extend_many(["a", "b", "c"], [RESPONSE[:5]] * 3)
    assert drafter.propose(["a", "b", "c"]).draft_tokens() == [[], [], []]
    # The same requests in a batch within the cap draft from the prompt's history.
    assert drafter.propose(["a", "b"]).draft_tokens() == [RESPONSE[5:9]] * 2


def test_batches_where_no_draft_could_pay_skip_the_tree_lookups(monkeypatch):
    """A cost-model policy whose cost says no draft can pay in a batch of 3: no lookup, empty
    drafts, the batch counted; in a batch of 1 it looks drafts up and drafts."""
    from policies.budget import CostModelPolicy
    from policies.cost_model import StepCostModel

    # A step costs 10 ms up to 3 tokens, and each draft token 4 ms more. One request's draft
    # (first token accepted with probability 1/2) pays: 3 expected tokens in 26 ms against 1
    # in 10 ms. Three requests already make 300 tokens/s, which any draft lowers, even a sure one.
    cost = StepCostModel(c_base=0.01, c_tok=0.0, knee_tokens=3, c_draft=0.004)
    policy = CostModelPolicy(cost, max_budget=4)
    drafter = DASDrafter(prompt_only(num_speculative_tokens=4), policy=policy, cost=cost)
    lookups = []
    speculate_many = drafter.forest.speculate_many
    monkeypatch.setattr(
        drafter.forest,
        "speculate_many",
        lambda *args, **kwargs: lookups.append(1) or speculate_many(*args, **kwargs),
    )
    drafter.begin_step(1)
    run_request(drafter, "r1", PROMPT_A, RESPONSE)
    drafter.begin_step(2)
    for rid, prompt in zip("abc", (PROMPT_A, PROMPT_B, PROMPT_B), strict=True):
        drafter.start_request(rid, prompt)
    drafter.extend_many(["a", "b", "c"], [RESPONSE[:5]] * 3)
    assert drafter.propose(["a", "b", "c"]).draft_tokens() == [[], [], []]
    assert lookups == [] and drafter.stats.num_skipped_batches == 1
    # One request alone: its draft may pay, so it is looked up, and it does.
    assert drafter.propose(["a"]).draft_tokens() == [RESPONSE[5:9]]
    assert lookups == [1] and drafter.stats.num_skipped_batches == 1


def lookups_and_gated_batches(monkeypatch, lookup_us, clock=None) -> tuple[int, int]:
    """Tree lookups and gated batches in 20 passes of 2 requests whose drafts are all wrong,
    under flat 10 ms steps (a request's accepted draft token would save 10 ms / 2)."""
    drafter, lookups = drafter_after_wrong_drafts(monkeypatch, lookup_us, clock)
    return len(lookups), drafter.stats.num_gated_batches


def drafter_after_wrong_drafts(monkeypatch, lookup_us, clock=None) -> tuple[DASDrafter, list]:
    """The drafter of :func:`lookups_and_gated_batches` after its 20 passes, and its lookups."""
    from policies.budget import CostModelPolicy
    from policies.cost_model import StepCostModel

    cost = StepCostModel(c_base=0.01, c_tok=0.0, knee_tokens=1000)
    config = prompt_only(num_speculative_tokens=4, lookup_us_per_request=lookup_us)
    policy = CostModelPolicy(cost, max_budget=4)
    options = {} if clock is None else {"clock": clock}
    drafter = DASDrafter(config, policy=policy, cost=cost, **options)
    lookups = []
    speculate_many = drafter.forest.speculate_many
    monkeypatch.setattr(
        drafter.forest,
        "speculate_many",
        lambda *a, f=speculate_many, **kw: lookups.append(1) or f(*a, **kw),
    )
    drafter.begin_step(1)
    run_request(drafter, "r1", PROMPT_A, RESPONSE)
    drafter.begin_step(2)
    for rid in "ab":
        drafter.start_request(rid, PROMPT_A)
    drafter.extend_many(["a", "b"], [RESPONSE[:5]] * 2)
    for step in range(20):
        # Tokens never seen before: every draft is wrong, and no lookup saves anything.
        drafter.propose(["a", "b"])
        drafter.extend_many(["a", "b"], [[1000 + 2 * step], [1001 + 2 * step]])
    return drafter, lookups


def test_a_gated_batch_with_an_unknown_request_is_a_failure_not_a_skip(monkeypatch):
    """A gated batch is not looked up, but its ids are still checked: an unknown one fails
    the batch (empty drafts, counted as a failure), as in a batch that is looked up."""
    drafter, lookups = drafter_after_wrong_drafts(monkeypatch, 3000.0)
    gated, failures = drafter.stats.num_gated_batches, drafter.stats.num_failures
    assert drafter.propose(["a", "b"]).draft_tokens() == [[], []]
    assert drafter.stats.num_gated_batches == gated + 1  # the next batch of 2 is gated
    assert drafter.propose(["a", "ghost"]).draft_tokens() == [[], []]
    assert drafter.stats.num_failures == failures + 1
    assert drafter.stats.num_gated_batches == gated + 1
    assert len(lookups) == 2


def test_batches_whose_lookups_saved_less_than_they_cost_are_not_looked_up(monkeypatch):
    """With lookups priced, a batch size whose last lookup's drafts saved less than the lookup
    took is skipped until the gate explores it again; a price of 0 never skips."""
    assert lookups_and_gated_batches(monkeypatch, 0.0) == (20, 0)
    # Priced at 3 ms per request: looked up once, then skipped 15 times in a row before the
    # 16th pass explores again, and then skipped 3 more times.
    assert lookups_and_gated_batches(monkeypatch, 3000.0) == (2, 18)


def test_measured_lookups_are_gated_by_the_time_the_drafter_clocked(monkeypatch):
    """``lookup_us_per_request="auto"``: the drafter times its own lookups. A clock that sees
    3 ms pass in a lookup of 2 requests gates as a price does; one that sees no time passing
    never gates."""

    def clock_advancing(seconds_per_call: float):
        calls = []
        return lambda: calls.append(1) or len(calls) * seconds_per_call

    # Looked up 5 times before the measured time prices the band, then skipped 15 in a row.
    assert lookups_and_gated_batches(monkeypatch, "auto", clock_advancing(0.003)) == (5, 15)
    assert lookups_and_gated_batches(monkeypatch, "auto", clock_advancing(0.0)) == (20, 0)


def test_live_sibling_tokens_draft_within_the_same_step():
    drafter = DASDrafter(prompt_only(num_speculative_tokens=3))
    drafter.begin_step(1)
    drafter.start_request("leader", PROMPT_A)
    drafter.start_request("follower", PROMPT_A)
    drafter.extend_request("leader", RESPONSE[:20])
    drafter.extend_request("follower", RESPONSE[:8])
    assert drafter.propose(["follower"]).draft_tokens() == [RESPONSE[8:11]]


def test_only_finished_rollouts_enter_history_and_stop_tokens_trim():
    drafter = DASDrafter(prompt_only(num_speculative_tokens=4))
    drafter.begin_step(1)
    run_request(drafter, "aborted", PROMPT_A, RESPONSE, reason="abort")
    drafter.start_request("dropped", PROMPT_A)
    drafter.extend_request("dropped", RESPONSE)
    drafter.abort_request("dropped")
    assert drafter.history.stats().num_rollouts == 0
    assert drafter.forest.num_sequences == 0  # nothing left behind
    key = drafter.start_request("kept", PROMPT_A)
    drafter.extend_request("kept", [*RESPONSE[:6], 2, 77, 78, 79])  # 2 = stop token
    drafter.finish_request("kept", "stop", stop_token_ids=[2])
    stored = drafter.forest.sequence_tokens(drafter.history.rollout_ids(key)[0])
    assert stored.tolist() == [*RESPONSE[:6], 2]
    drafter.forest.check_integrity()


def test_window_evicts_old_steps_without_rebuilding():
    drafter = DASDrafter(prompt_only(window_rule="steps", window_steps=1, num_speculative_tokens=2))
    drafter.begin_step(1)
    run_request(drafter, 1, PROMPT_A, RESPONSE)
    drafter.begin_step(2)  # window of 1: step 1 is still the last step
    assert drafter.history.steps == [1]
    run_request(drafter, 2, PROMPT_A, [5, 6, 7])
    drafter.begin_step(3)
    assert drafter.history.steps == [2]
    drafter.start_request(3, PROMPT_A)
    drafter.extend_request(3, RESPONSE[:4])
    assert drafter.propose([3]).draft_tokens() == [[]]
    drafter.forest.check_integrity()


def test_prompt_key_is_a_hash_of_the_prompt_unless_given():
    drafter = DASDrafter()
    drafter.begin_step(1)
    key_1 = drafter.start_request("x", PROMPT_A)
    key_2 = drafter.start_request("y", list(PROMPT_A))
    key_3 = drafter.start_request("z", PROMPT_A, prompt_key="dataset-7")
    assert key_1 == key_2 != key_3 == "dataset-7"


class _BrokenPolicy(BudgetPolicy):
    def batch_budgets(self, batch: BatchView, cost=None) -> np.ndarray:
        raise RuntimeError("policy bug")


def test_a_drafter_failure_falls_back_to_no_speculation():
    drafter = DASDrafter(prompt_only(), policy=_BrokenPolicy())
    drafter.begin_step(1)
    run_request(drafter, 1, PROMPT_A, RESPONSE)
    drafter.start_request(2, PROMPT_A)
    drafter.extend_request(2, RESPONSE[:5])
    proposal = drafter.propose([2])
    assert proposal.draft_tokens() == [[]]
    assert drafter.stats.num_failures == 1


def test_calibration_learns_that_a_source_is_not_accepted():
    drafter = DASDrafter(DASConfig(use_global_tree=False, use_prompt_history=False))
    drafter.begin_step(1)
    drafter.start_request(1, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2])
    before = drafter.calibration.factors()[SOURCES.index("own")].copy()
    for _ in range(20):
        proposal = drafter.propose([1])
        if proposal.draft_tokens()[0]:
            drafter.extend_request(1, [99])  # the target never agrees
        else:
            drafter.extend_request(1, [1, 2])
    after = drafter.calibration.factors()[SOURCES.index("own")]
    assert after.min() < before.min() * 0.7


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"num_speculative_tokens": 0}, "num_speculative_tokens=0"),
        ({"policy": "magic"}, "policy='magic'"),
        ({"min_token_prob": 2.0}, "min_token_prob=2.0"),
        ({"bogus_key": 1}, r"unknown DAS config key\(s\) \['bogus_key'\]"),
        ({"max_draft_batch": 0}, "max_draft_batch=0"),
        ({"max_draft_batch": 2.5}, "max_draft_batch=2.5"),
        ({"lookup_us_per_request": -1.0}, "lookup_us_per_request=-1.0"),
        ({"lookup_us_per_request": "fast"}, "lookup_us_per_request='fast'"),
        ({"max_spec_factor": "long"}, "max_spec_factor='long'"),
        ({"max_spec_factor": 0}, "max_spec_factor=0"),
        ({"max_spec_factor": True}, "max_spec_factor=True"),
    ],
)
def test_config_errors_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        DASConfig.from_dict(bad)


def test_lifecycle_misuse_names_the_request():
    drafter = DASDrafter()
    drafter.begin_step(1)
    drafter.start_request("r", PROMPT_A)
    with pytest.raises(ValueError, match="request_id='r' is already running"):
        drafter.start_request("r", PROMPT_A)
    with pytest.raises(ValueError, match="request_id='nope' is not running"):
        drafter.extend_request("nope", [1])
    with pytest.raises(ValueError, match="empty prompt"):
        drafter.start_request("e", [])


def test_calibration_compares_acceptance_with_the_raw_tree_probabilities():
    # Once a source's factor is below 1, what it records as "expected" must still be the tree's
    # own raw probabilities of the positions tried; recording calibrated values would make the
    # factor measure f / f_previous and oscillate instead of converging.
    drafter = DASDrafter(
        DASConfig(use_global_tree=False, use_prompt_history=False, num_speculative_tokens=4)
    )
    drafter.begin_step(1)
    loop = [1, 2, 3, 4, 5, 6, 7, 8]
    drafter.start_request(1, loop * 4)
    own = SOURCES.index("own")
    for _ in range(10):  # the target rejects every draft: the factor drops
        drafter.propose([1])
        drafter.extend_request(1, [99])
        drafter.extend_request(1, loop)
    proposal = drafter.propose([1])
    bucket = int(np.log2(proposal.drafts.match_lens[0])) if proposal.drafts.match_lens[0] else 0
    bucket = min(bucket, 4)
    assert drafter.calibration.factors()[own, bucket] < 0.9
    num = proposal.drafts.num_tokens[0]
    before = drafter.calibration.expected[own, bucket]
    # The target accepts the first token only: positions tried are the first two.
    draft = proposal.draft_tokens()[0]
    assert num >= 2
    drafter.extend_request(1, [draft[0], 99])
    tried = proposal.drafts.probs[0, :2].sum()
    assert drafter.calibration.expected[own, bucket] - before == pytest.approx(tried)


@pytest.mark.parametrize(
    ("policy", "knee_tokens", "draft"),
    [("cost_model", 64.0, [2, 3]), ("cost_model", 0.0, [2]), ("fixed", 64.0, [2])],
)
def test_by_default_only_the_cost_model_policy_drafts_past_a_match_where_steps_are_flat(
    policy, knee_tokens, draft
):
    """max_spec_factor "auto": a one-token match drafts two tokens for the cost-model policy
    while its step cost is flat for small steps (a GPU's), one (vLLM's suffix default) on a
    cost that charges every token (a CPU's) and for the other policies."""
    cost = StepCostModel(c_base=0.01, c_tok=1e-5, knee_tokens=knee_tokens)
    drafter = DASDrafter(
        DASConfig(use_global_tree=False, use_prompt_history=False, policy=policy), cost=cost
    )
    drafter.begin_step(1)
    drafter.start_request(1, [1, 2, 3, 4, 5, 6, 7, 8, 1])  # ends with a one-token match
    assert drafter.propose([1]).draft_tokens() == [draft]


def test_draft_positions_past_the_match_are_calibrated_apart():
    """With max_spec_factor 4, a one-token match drafts four tokens. A target that always
    accepts the first (within the match) and rejects the second (past it) must raise the first
    position's prediction and lower the next one's; one factor for the whole draft would lower
    both (the first to about 0.34 here)."""
    drafter = DASDrafter(
        DASConfig(
            use_global_tree=False,
            use_prompt_history=False,
            num_speculative_tokens=8,
            max_spec_factor=4.0,
            min_token_prob=0.0,
        )
    )
    drafter.begin_step(1)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1]  # ends with a one-token match: 1 -> 2, 3, 4, 5
    own = SOURCES.index("own")
    for rid in range(30):
        drafter.start_request(rid, prompt)
        proposal = drafter.propose([rid])
        assert proposal.draft_tokens()[0] == [2, 3, 4, 5]
        assert proposal.drafts.match_lens[0] == 1
        drafter.extend_request(rid, [2, 99])
        drafter.finish_request(rid, "stop")
    assert drafter.calibration.accepted_beyond[own, 0] == 0
    assert drafter.calibration.expected_beyond[own, 0] > 0
    drafter.start_request("last", prompt)
    drafter.propose(["last"])
    predicted = drafter._requests["last"].pending_cumulative
    # Raw conditional probabilities: 1/2 for the first token (two 1s, one continued), then 1.
    assert predicted[0] > 0.8
    assert predicted[1] < 0.5 * predicted[0]


def test_stats_count_drafts_and_acceptance_per_length_class():
    drafter = DASDrafter(prompt_only(num_speculative_tokens=4))
    drafter.begin_step(1)
    # Of two prompts, the longer (A, 30 tokens) is classed medium and B (6 tokens) short.
    run_request(drafter, "a-1", PROMPT_A, RESPONSE)
    run_request(drafter, "b-1", PROMPT_B, RESPONSE[:6])
    drafter.begin_step(2)
    drafter.start_request("a", PROMPT_A)
    drafter.start_request("b", PROMPT_B)
    drafter.extend_many(["a", "b"], [RESPONSE[:5], RESPONSE[:3]])
    drafts = drafter.propose(["a", "b"]).draft_tokens()
    assert drafts == [RESPONSE[5:9], RESPONSE[3:6]]  # B: history ends after 6 tokens
    # A's target agrees with 2 draft tokens then differs; B's agrees with all 3.
    drafter.extend_many(["a", "b"], [[*RESPONSE[5:7], 999], RESPONSE[3:7]])
    stats = drafter.stats
    assert stats.drafts_by_class == {"long": 0, "medium": 1, "short": 1}
    assert stats.draft_tokens_by_class == {"long": 0, "medium": 4, "short": 3}
    assert stats.accepted_by_class == {"long": 0, "medium": 2, "short": 3}
    assert sum(stats.accepted_by_class.values()) == stats.num_accepted_tokens
    assert stats.by_step == {2: {"drafts": 2, "draft_tokens": 7, "accepted": 5}}
    key_a = drafter.prompt_key("a")
    assert stats.by_prompt[key_a] == {"drafts": 1, "draft_tokens": 4, "accepted": 2}
    drafter.begin_step(3)  # per-prompt counts cover the current step only: bounded by its prompts
    assert stats.by_prompt == {} and 2 in stats.by_step


def test_integrity_check_finds_a_sequence_no_request_or_history_holds():
    drafter = DASDrafter(DASConfig(calibrate=False, num_speculative_tokens=4))
    drafter.begin_step(1)
    run_request(drafter, "kept", PROMPT_A, RESPONSE)
    drafter.start_request("dropped", PROMPT_B)
    drafter.extend_request("dropped", RESPONSE)
    drafter.check_integrity()  # a running request's sequences are allowed
    drafter.abort_request("dropped")
    drafter.check_integrity()
    drafter.forest.append(("stray", 0), np.asarray(RESPONSE, np.int32), tree="stray")
    with pytest.raises(AssertionError, match="forest holds"):
        drafter.check_integrity()


def test_drafts_of_two_propose_calls_are_scored_as_those_of_one():
    """Request a's draft comes from one propose call (its second row) and b's from a later one
    (also its second row; c's draft of the first call is replaced in the second); one extend
    then scores them exactly as if one call had drafted all three together."""
    at = {"a": 5, "b": 15, "c": 10}  # tokens generated so far: each drafts other tokens

    def scored(calls: list[list[str]]) -> DASDrafter:
        drafter = DASDrafter(prompt_only(num_speculative_tokens=4))
        drafter.record_reliability = True  # the map's statistics too, without applying it
        drafter.begin_step(1)
        run_request(drafter, "r1", PROMPT_A, RESPONSE)
        drafter.begin_step(2)
        for rid, n in at.items():
            drafter.start_request(rid, PROMPT_A)
            drafter.extend_request(rid, RESPONSE[:n])
        for batch in calls:
            drafts = drafter.propose(batch).draft_tokens()
            assert drafts == [RESPONSE[at[rid] : at[rid] + 4] for rid in batch]
        # a's draft is accepted for 3 tokens, b's and c's for all 4.
        produced = {rid: RESPONSE[n : n + 5] for rid, n in at.items()}
        produced["a"] = [*RESPONSE[5:8], 99]
        drafter.extend_many(list(produced), list(produced.values()))
        return drafter

    apart, together = scored([["c", "a"], ["c", "b"]]), scored([["a", "b", "c"]])
    assert apart.stats.num_accepted_tokens == together.stats.num_accepted_tokens == 11
    # (c's replaced draft counts as one more draft; only its second is scored.)
    assert [c["accepted"] for c in apart.stats.by_prompt.values()] == [11]
    assert [c["drafts"] for c in apart.stats.by_prompt.values()] == [4]
    np.testing.assert_array_equal(apart.calibration.accepted, together.calibration.accepted)
    np.testing.assert_array_equal(apart.calibration.expected, together.calibration.expected)
    np.testing.assert_array_equal(apart.reliability.tried, together.reliability.tried)
    np.testing.assert_array_equal(apart.reliability.accepted, together.reliability.accepted)
