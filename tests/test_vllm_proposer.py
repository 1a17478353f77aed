"""The vLLM proposer's pure parts, and the two cases a real engine cannot reach (seconds).

Drafting, history, aborts, EOS, out-of-vocabulary drafts and drafter faults are tested inside
vLLM itself (``tests/test_vllm_robustness_slow.py``, ``tests/test_vllm_das_slow.py``). What stays
here needs a clock the test controls: the online cost fit's observations of step times and of
the KV tokens each step reads.

``FakeEngine`` (a stand-in, not vLLM) plays vLLM 0.32's scheduler and runner around
:class:`DASProposer` as the patch point wires it: ``das_on_schedule`` before each step (with the
previous step's finished requests), then greedy verification of the last drafts against a
deterministic "model", then ``propose`` with the runner's arrays.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from das.vllm.api import das_speculative_config
from das.vllm.proposer import DASProposer, classify_finish

VOCAB = 1000
EOS = 999
MAX_MODEL_LEN = 96
K = 4


def next_token(prompt: list[int], position: int) -> int:
    """The fake model: a token determined by the prompt and the output position."""
    return (sum(prompt) * 7 + position * 13) % 500 + 1


def make_config(**das: object) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=K),
        model_config=SimpleNamespace(max_model_len=MAX_MODEL_LEN, get_vocab_size=lambda: VOCAB),
        additional_config={"das": {"policy": "fixed", **das}},
        device_config=SimpleNamespace(device_type="cpu"),
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Scheduler + runner bookkeeping of vLLM 0.32 (sync scheduling), greedy verification."""

    def __init__(self, proposer: DASProposer, max_rows: int = 8) -> None:
        self.proposer = proposer
        self.clock = proposer._clock
        self.requests: dict[str, SimpleNamespace] = {}
        self.input_batch = SimpleNamespace(req_ids=[])
        self.token_ids_cpu = np.zeros((max_rows, MAX_MODEL_LEN), np.int32)
        self.num_tokens_no_spec = np.zeros(max_rows, np.int64)
        self.drafts: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.outputs: dict[str, list[int]] = {}
        self.num_accepted = 0
        self.spec_steps = 0  # steps that scheduled any draft, and their requests
        self.spec_step_requests = 0

    def add(
        self,
        rid: str,
        prompt: list[int],
        max_tokens: int,
        stop_at: int | None = None,
        **extra: object,
    ) -> None:
        params = SimpleNamespace(
            max_tokens=max_tokens, eos_token_id=EOS, stop_token_ids=[], extra_args=extra or None
        )
        state = SimpleNamespace(
            prompt_token_ids=list(prompt),
            sampling_params=params,
            output_token_ids=[],
            stop_at=stop_at,
            new=True,
        )
        self.requests[rid] = state

    def abort(self, rid: str) -> None:
        self.finished.append(rid)

    def step(self) -> None:
        """One engine step: schedule, verify drafts, bookkeeping, propose."""
        finished, self.finished = self.finished, []
        for rid in finished:
            if rid in self.input_batch.req_ids:
                self.input_batch.req_ids.remove(rid)
        running = [rid for rid in self.requests if rid not in finished]
        scheduled = sum(1 + len(self.drafts.get(rid, [])) for rid in running)
        per_request = {}
        for rid in running:
            state = self.requests[rid]
            state.num_computed_tokens = len(state.prompt_token_ids) + len(state.output_token_ids)
            per_request[rid] = (
                len(state.prompt_token_ids) if state.new else 1 + len(self.drafts.get(rid, []))
            )
        self.last_schedule = SimpleNamespace(  # the fields of vLLM's SchedulerOutput DAS reads
            finished_req_ids=set(finished),
            total_num_scheduled_tokens=scheduled,
            scheduled_new_reqs=[rid for rid in running if self.requests[rid].new],
            num_scheduled_tokens=per_request,
            scheduled_spec_decode_tokens={rid: self.drafts.get(rid, []) for rid in running},
        )
        if any(self.drafts.get(rid) for rid in running):
            self.spec_steps += 1
            self.spec_step_requests += len(running)
        self.proposer.das_on_schedule(self, self.last_schedule)
        for rid in finished:
            self.requests.pop(rid, None)
            self.drafts.pop(rid, None)
        self.input_batch.req_ids = list(self.requests)
        sampled = []
        for row, rid in enumerate(self.input_batch.req_ids):
            state = self.requests[rid]
            if state.new:
                state.new = False
                prompt = state.prompt_token_ids
                self.token_ids_cpu[row, : len(prompt)] = prompt
                self.num_tokens_no_spec[row] = len(prompt)
            else:  # the runner's arrays follow its rows (rows only shrink from the end here)
                n = len(state.prompt_token_ids) + len(state.output_token_ids)
                self.token_ids_cpu[row, :n] = state.prompt_token_ids + state.output_token_ids
                self.num_tokens_no_spec[row] = n
            tokens = self._verify(rid, state)
            n = int(self.num_tokens_no_spec[row])
            self.token_ids_cpu[row, n : n + len(tokens)] = tokens
            self.num_tokens_no_spec[row] = n + len(tokens)
            state.output_token_ids.extend(tokens)
            sampled.append(tokens)
            reason, num_kept = self._classify(state)
            if reason is not None:
                self.finished.append(rid)
                self.outputs[rid] = state.output_token_ids[:num_kept]
        self.clock.now += 0.01 * (1 + scheduled)
        drafts = self.proposer.propose(sampled, self.num_tokens_no_spec, self.token_ids_cpu)
        assert len(drafts) == len(sampled)
        self.drafts = dict(zip(self.input_batch.req_ids, drafts, strict=True))

    def _target(self, state: SimpleNamespace, position: int) -> int:
        if state.stop_at is not None and position == state.stop_at:
            return EOS
        return next_token(state.prompt_token_ids, position)

    def _verify(self, rid: str, state: SimpleNamespace) -> list[int]:
        position = len(state.output_token_ids)
        tokens = []
        for draft_token in self.drafts.get(rid, []):
            truth = self._target(state, position + len(tokens))
            if draft_token != truth:
                break
            tokens.append(truth)
            self.num_accepted += 1
        tokens.append(self._target(state, position + len(tokens)))  # the bonus token
        return tokens

    def _classify(self, state: SimpleNamespace) -> tuple[str | None, int]:
        return classify_finish(
            state.output_token_ids,
            len(state.prompt_token_ids),
            state.sampling_params.max_tokens,
            EOS,
            (),
            MAX_MODEL_LEN,
        )

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.requests and not self.finished:
                return
            self.step()
        raise AssertionError("requests did not finish")


def make_proposer(**das: object) -> DASProposer:
    return DASProposer(make_config(**das), clock=FakeClock(), register_plugin=lambda: True)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


def run_step(engine: FakeEngine, step_name: str, samples: int = 2, **extra: object) -> None:
    for p, prompt in enumerate(PROMPTS):
        for s in range(samples):
            engine.add(f"{step_name}-{p}-{s}", prompt, max_tokens=24, **extra)
    engine.run()


def test_cost_model_policy_observes_step_times_with_fake_runner_and_clock() -> None:
    # Drafts no longer than their matches: this small workload's steps then process the four
    # distinct token counts the fitter needs before its first fit.
    proposer = make_proposer(policy="cost_model", max_spec_factor=1.0)
    engine = FakeEngine(proposer)
    for name in "abc":
        run_step(engine, name)
    stats = proposer.stats()
    assert stats["num_cost_observations"] > 10
    # Steps that verified drafts, and their requests, as the fake engine scheduled them.
    assert stats["num_spec_steps"] == engine.spec_steps > 0
    assert stats["num_spec_step_requests"] == engine.spec_step_requests > engine.spec_steps
    # The fake engine charges 10 ms per token; a draft token's price is c_tok + c_draft (with a
    # constant number of requests, the fit cannot tell the two apart, and need not).
    cost = stats["cost_model"]
    assert cost["c_tok"] + cost["c_draft"] == pytest.approx(0.01, rel=0.05)


def test_classify_finish_replays_check_stop() -> None:
    # EOS at the third token; the runner holds two more tokens from the verified draft.
    assert classify_finish([4, 5, EOS, 6, 7], 10, 100, EOS, (), 1000) == ("stop", 3)
    assert classify_finish([4, 5, 6], 10, 100, EOS, (5,), 1000) == ("stop", 2)
    assert classify_finish([4, 5, 6, 7], 10, 3, EOS, (), 1000) == ("length", 3)
    assert classify_finish([4, 5, 6], 10, 100, EOS, (), 12) == ("length", 2)
    assert classify_finish([4, 5, 6], 10, 100, None, (), 1000) == (None, 3)  # aborted
    assert classify_finish([EOS], 10, 100, None, (), 1000) == (None, 1)  # ignore_eos


def test_das_speculative_config_is_exact_and_validated() -> None:
    settings = das_speculative_config({"window_steps": 3}, num_speculative_tokens=6)
    assert settings["speculative_config"] == {
        "method": "custom_class",
        "model": "das.vllm.proposer.DASProposer",
        "num_speculative_tokens": 6,
    }
    assert settings["additional_config"]["das"]["window_steps"] == 3
    assert settings["additional_config"]["das"]["num_speculative_tokens"] == 6
    with pytest.raises(ValueError, match="bogus_key"):
        das_speculative_config({"bogus_key": 1})
    with pytest.raises(ValueError, match="disagrees"):
        das_speculative_config({"num_speculative_tokens": 3}, num_speculative_tokens=6)


def test_proposer_rejects_unknown_keys_and_mismatched_k() -> None:
    with pytest.raises(ValueError, match="bogus_key"):
        make_proposer(bogus_key=1)
    with pytest.raises(ValueError, match="must equal"):
        make_proposer(num_speculative_tokens=K + 1)


def test_cost_observations_are_decode_steps_with_attended_kv_tokens_with_fake_runner() -> None:
    from das.vllm.proposer import decode_step_attended_tokens

    runner = SimpleNamespace(
        requests={
            "a": SimpleNamespace(num_computed_tokens=100),
            "b": SimpleNamespace(num_computed_tokens=10),
        }
    )

    def schedule(new, scheduled, drafts):
        return SimpleNamespace(
            scheduled_new_reqs=new,
            num_scheduled_tokens=scheduled,
            scheduled_spec_decode_tokens=drafts,
        )

    # a verifies 2 drafts (3 tokens reading ~100 KV tokens each), b decodes one token.
    assert decode_step_attended_tokens(runner, schedule([], {"a": 3, "b": 1}, {"a": [7, 8]})) == (
        3 * 103 + 1 * 11
    )
    assert decode_step_attended_tokens(runner, schedule(["c"], {"a": 1}, {})) is None
    assert decode_step_attended_tokens(runner, schedule([], {"a": 64}, {})) is None  # a chunk

    proposer = make_proposer(policy="cost_model")
    engine = FakeEngine(proposer)
    run_step(engine, "a")
    window = proposer.stats()["cost_window"]
    assert window["num_tokens"] and min(window["context_tokens"]) > 0
    # Every observed step is a decode step: no prompt-sized token counts.
    assert max(window["num_tokens"]) <= engine.proposer.num_speculative_tokens * 8 + 8


def test_cpu_cost_prior_prices_verification_and_honours_the_profile_env(monkeypatch) -> None:
    from das.vllm.proposer import CPU_DRAFT_COST, CPU_SPEC_REQUEST_COST, default_cost_prior

    monkeypatch.delenv("DAS_COST_PROFILE", raising=False)
    prior = default_cost_prior(on_cpu=True)
    assert (prior.c_draft, prior.c_spec_request) == (CPU_DRAFT_COST, CPU_SPEC_REQUEST_COST)
    # a step of 256 requests that verifies one draft costs what its 256 requests add
    with_draft = prior.step_time(257, draft_tokens=1)
    assert with_draft - prior.step_time(257) == pytest.approx(
        CPU_DRAFT_COST + 256 * CPU_SPEC_REQUEST_COST
    )
    monkeypatch.setenv("DAS_COST_PROFILE", "0.05,0.001")
    assert default_cost_prior(on_cpu=True).c_spec_request == 0.0


def test_gpu_cost_prior_is_fitted_to_the_measured_h100_table(monkeypatch) -> None:
    """On a GPU the policy starts from the measured whole-step curve, not a guess."""
    from das.vllm.proposer import default_cost_prior
    from policies.profiles import load_cost_model
    from policies.step_shapes import StepShapes

    monkeypatch.delenv("DAS_COST_PROFILE", raising=False)
    prior = default_cost_prior(on_cpu=False)
    table = load_cost_model("h100")
    # Decode steps of B requests at 2k tokens of context each, without drafts and with 7 each.
    batch = np.array([1, 16, 64, 256])
    for drafts in (0, 7):
        shapes = StepShapes.from_columns(
            num_tokens=batch * (1 + drafts),
            draft_tokens=batch * drafts,
            num_requests=batch,
            kv_tokens=batch * 2048,
            context_tokens=batch * (1 + drafts) * 2048,
        )
        np.testing.assert_allclose(prior.times(shapes), table.times(shapes), rtol=0.2)


def test_the_lookup_price_reaches_the_engines_policy_and_gate() -> None:
    """``lookup_us_per_request`` in vLLM's additional_config prices the engine drafter's
    lookups in both places that use it, and the stats report the gated batches; left out,
    the engine's drafter measures its lookups."""
    priced = make_proposer(policy="cost_model", lookup_us_per_request=7.0)
    assert priced.drafter.lookup_gate.lookup_s_per_request == pytest.approx(7e-6)
    assert priced.drafter.policy.lookup_s_per_request == pytest.approx(7e-6)
    assert priced.stats()["num_gated_batches"] == 0
    free = make_proposer(policy="cost_model", lookup_us_per_request=0)
    assert free.drafter.lookup_gate.lookup_s_per_request == 0.0
    assert not free.drafter.lookup_gate.enabled
    # By default an engine's drafter times its own lookups: the gate measures them.
    measured = make_proposer(policy="cost_model")
    assert measured.drafter.lookup_gate.measures
    assert measured.drafter.policy.lookup_s_per_request == 0.0
