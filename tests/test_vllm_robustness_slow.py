"""DAS under what a real RL run does to an engine: preemption, aborts, wrong drafts, limits (slow).

Two engines on the default model in float32, one after the other, each with a KV cache so small
that vLLM preempts and recomputes requests all the time: a baseline without speculation, then a
DAS engine (K=4, fixed policy: the most drafts). Both run the same workload; every DAS output must
equal the baseline's token for token:

* three greedy RL steps (each prompt twice): from step 2 on, history drafts nearly every token,
  so preempted requests come back with drafts in flight;
* one position-keyed sampled step with ``n=4`` (vLLM seeds child i with seed + i);
* limits: ``max_tokens`` shorter than the history drafts, prompts that end a few tokens short of
  ``max_model_len``, a stop string in the middle of history's text, short answers whose history
  drafts run through EOS;
* aborts: a third of a step's requests aborted at random iterations while drafting;
* test-only draft faults (:mod:`das.vllm.faults`): random drafts, the right drafts one position
  late, drafts past the vocabulary, and a proposer that raises every few calls.

    pytest -m slow tests/test_vllm_robustness_slow.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest

from das.default_model import resolve_model
from das.vllm.api import das_llm, das_stats
from das.vllm.engine import chat_prompt_token_ids, make_llm, shutdown_llm
from das.vllm.keyed import position_keyed_params
from rollouts.prompts import format_gsm8k_messages, load_prompts

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

NUM_PROMPTS = 8
NUM_SAMPLES = 2  # greedy forbids n > 1: each prompt is submitted twice
NUM_STEPS = 3
MAX_TOKENS = 64
K = 4
MAX_MODEL_LEN = 512
KV_CACHE_TOKENS = 1024  # about 6 requests of ~170 tokens: vLLM must preempt to run 16
NUM_SMALL = 4  # prompts of the keyed and near-max_model_len phases
NUM_CHILDREN = 4
SHORT_MAX_TOKENS = 20  # history drafts run past this limit
ROOM_BEFORE_MAX_MODEL_LEN = 24  # long prompts end this many tokens short of max_model_len
ABORTED_SHARE = 3  # one request in ABORTED_SHARE is aborted
FAULTS = (("random", 1), ("shifted", 1), ("out_of_vocab", 1), ("raise", 7))
FAULT_MAX_TOKENS = 40
# Questions the default model answers in a few words and EOS: history drafts cross the EOS.
SHORT_ANSWERS = (
    "What is 2 + 3? Answer with the number only.",
    "What color is the sky? One word.",
    "Name a fruit.",
    "What is the capital of France?",
)


def kv_cache_gib() -> float:
    """KV_CACHE_TOKENS of the default model in float32, in GiB."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(None))
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    return KV_CACHE_TOKENS * per_token / 2**30


def engine_settings() -> dict[str, Any]:
    return {
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "kv_cache_gib": kv_cache_gib(),
        "seed": 0,
    }


def num_preemptions(llm) -> int:
    return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    rows = load_prompts(None, NUM_PROMPTS, seed=2)
    return [chat_prompt_token_ids(tokenizer, format_gsm8k_messages(row.text)) for row in rows]


def greedy(max_tokens: int = MAX_TOKENS, **kwargs: Any):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def generate(llm, prompts: list[list[int]], params, label: str) -> list[list[int]]:
    """One generate call; the first sample's tokens of each request, in order."""
    started = time.perf_counter()
    batch = [{"prompt_token_ids": p} for p in prompts]
    outputs = llm.generate(batch, params, use_tqdm=False)
    logger.info("%s: %.1f s", label, time.perf_counter() - started)
    return [list(o.outputs[0].token_ids) for o in outputs]


def long_prompts(tokenizer) -> list[list[int]]:
    """Counting texts (the model keeps counting) ending ROOM_BEFORE_MAX_MODEL_LEN tokens short
    of max_model_len, so that outputs run into the limit with drafts in flight."""
    target = MAX_MODEL_LEN - ROOM_BEFORE_MAX_MODEL_LEN
    prompts = []
    for start in range(1, NUM_SMALL + 1):
        text = ", ".join(str(n) for n in range(start * 7, start * 7 + 400))
        prompts.append(tokenizer.encode(text)[:target])
    return prompts


def stop_string(tokenizer, tokens: list[int]) -> str:
    """A few words from the middle of an earlier output: a stop string history will draft."""
    text = tokenizer.decode(tokens[len(tokens) // 2 :], skip_special_tokens=True)
    words = text.split()
    return " ".join(words[:2]) if len(words) >= 2 else text.strip()


def abort_run(llm, prompts: list[list[int]], rng_seed: int) -> tuple[dict, set[str]]:
    """Add every request and step the engine; at random iterations, abort a random request that
    has produced tokens and not finished, until one in ABORTED_SHARE is aborted. Returns the
    finished requests' tokens and the aborted ids."""
    engine = llm.llm_engine
    rng = np.random.default_rng(rng_seed)
    ids = [f"abort-{i}" for i in range(len(prompts))]
    for i, (request_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
        # Keys new to history (one per prompt): what enters history here is this run's alone.
        key = {"das_prompt_key": f"abort-run-{i // NUM_SAMPLES}"}
        engine.add_request(request_id, {"prompt_token_ids": prompt}, greedy(extra_args=key))
    target = len(ids) // ABORTED_SHARE
    finished: dict[str, list[int]] = {}
    generating: set[str] = set()  # produced at least two tokens (drafts flow from the second)
    aborted: set[str] = set()
    while engine.has_unfinished_requests():
        candidates = sorted(generating - aborted - finished.keys())
        if len(aborted) < target and candidates and rng.random() < 0.2:
            victim = str(rng.choice(candidates))
            engine.abort_request([victim])
            aborted.add(victim)
        for output in engine.step():
            if output.request_id in aborted:
                continue
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
            elif len(output.outputs[0].token_ids) >= 2:
                generating.add(output.request_id)
    return finished, aborted


def run_workload(llm, prompts: list[list[int]], tokenizer, label: str, das: bool) -> dict:
    """Every phase of the module docstring; DAS engines also record their drafter stats."""
    result: dict[str, Any] = {"greedy": [], "stats": [], "preemptions": []}
    batch = [p for p in prompts for _ in range(NUM_SAMPLES)]
    for step in range(NUM_STEPS):
        before = num_preemptions(llm)
        result["greedy"].append(generate(llm, batch, greedy(), f"{label} greedy {step + 1}"))
        result["preemptions"].append(num_preemptions(llm) - before)
        logger.info("%s greedy %d: %d preemptions", label, step + 1, result["preemptions"][-1])
        if das:
            result["stats"].append(das_stats(llm)["drafter"][0])
    keyed = [
        position_keyed_params(1000 + p, n=NUM_CHILDREN, temperature=1.0, max_tokens=MAX_TOKENS)
        for p in range(len(prompts))
    ]
    small = prompts[:NUM_SMALL]
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in small], keyed[:NUM_SMALL], use_tqdm=False
    )
    result["keyed"] = [[list(c.token_ids) for c in o.outputs] for o in outputs]
    result["short"] = generate(llm, prompts, greedy(SHORT_MAX_TOKENS), f"{label} short")
    long = long_prompts(tokenizer)
    # Twice: the second time history holds the first's outputs and drafts to the limit.
    result["long"] = [generate(llm, long, greedy(), f"{label} long {i}") for i in (1, 2)]
    short = [
        chat_prompt_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in SHORT_ANSWERS
    ]
    result["eos"] = [generate(llm, short, greedy(), f"{label} EOS {i}") for i in (1, 2)]
    stops = [stop_string(tokenizer, tokens) for tokens in result["greedy"][0][::NUM_SAMPLES]]
    params = [greedy(stop=[s]) for s in stops]
    result["stops"] = stops
    result["stopped"] = generate(llm, prompts, params, f"{label} stop strings")
    if das:
        result["before_aborts"] = das_stats(llm)["drafter"][0]
        finished, aborted = abort_run(llm, batch, rng_seed=5)
        result["aborts"] = (finished, aborted)
        result["after_aborts"] = das_stats(llm)["drafter"][0]
        result["integrity_after_aborts"] = llm.collective_rpc("das_check_integrity")[0]
        result["faults"] = {}
        for mode, every in FAULTS:
            llm.collective_rpc("das_set_fault", args=(mode, every))
            before = das_stats(llm)
            tokens = generate(llm, prompts, greedy(FAULT_MAX_TOKENS), f"{label} fault {mode}")
            after = das_stats(llm)
            fault = llm.collective_rpc("das_set_fault", args=(None,))[0]
            result["faults"][mode] = (tokens, before, after, fault)
        result["final"] = das_stats(llm)["drafter"][0]
        result["integrity"] = llm.collective_rpc("das_check_integrity")[0]
    return result


@pytest.fixture(scope="module")
def baseline(prompts, tokenizer) -> dict:
    llm = make_llm(None, async_scheduling=False, **engine_settings())
    try:
        return run_workload(llm, prompts, tokenizer, "baseline", das=False)
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def speculative(prompts, tokenizer, baseline) -> dict:  # after the baseline: one engine at once
    llm = das_llm(None, das={"policy": "fixed"}, num_speculative_tokens=K, **engine_settings())
    try:
        return run_workload(llm, prompts, tokenizer, "DAS", das=True)
    finally:
        shutdown_llm(llm)


def delta(after: dict, before: dict | None, key: str) -> int:
    return after[key] - (before[key] if before else 0)


def assert_same(expected: list, got: list, what: str) -> None:
    differ = [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
    assert not differ, f"{what}: requests {differ} differ"


# ------------------------------------------------------------------------------ preemption
def test_greedy_outputs_identical_under_preemption(baseline, speculative) -> None:
    for step in range(NUM_STEPS):
        assert_same(baseline["greedy"][step], speculative["greedy"][step], f"step {step + 1}")
    logger.info(
        "preemptions per step: baseline %s, DAS %s",
        baseline["preemptions"],
        speculative["preemptions"],
    )
    # Many preemptions, and in the steps where history drafts nearly every token.
    assert all(n >= 5 for n in speculative["preemptions"][1:])
    assert sum(speculative["preemptions"]) >= 25


def test_history_holds_each_finished_rollout_once_and_drafts_are_accepted(speculative) -> None:
    stats = speculative["stats"]
    per_step = NUM_PROMPTS * NUM_SAMPLES
    for step, current in enumerate(stats, start=1):
        assert current["history"]["num_rollouts"] == step * per_step
        assert current["num_finished"] == step * per_step and current["num_running"] == 0
    # Steps 2 and 3 redo step 1's greedy outputs: a history draft is wrong only when a draft
    # position disagrees with an output the model produced before.
    for step in (2, 3):
        drafted = delta(stats[step - 1], stats[step - 2], "num_draft_tokens")
        accepted = delta(stats[step - 1], stats[step - 2], "num_accepted_tokens")
        logger.info("step %d: %d/%d draft tokens accepted", step, accepted, drafted)
        assert drafted > 0 and accepted >= 0.9 * drafted, (step, accepted, drafted)
    assert stats[-1]["num_proposer_failures"] == 0


def test_keyed_children_identical(baseline, speculative) -> None:
    assert_same(baseline["keyed"], speculative["keyed"], "n=4 position-keyed")
    children = speculative["keyed"][0]
    assert len(children) == NUM_CHILDREN and len({tuple(c) for c in children}) > 1


# ---------------------------------------------------------------------------------- limits
def test_limits_identical(baseline, speculative, tokenizer) -> None:
    assert_same(baseline["short"], speculative["short"], "max_tokens below the drafts")
    assert all(len(t) <= SHORT_MAX_TOKENS for t in speculative["short"])
    for i in range(2):
        assert_same(baseline["long"][i], speculative["long"][i], f"near max_model_len ({i + 1})")
    outputs = speculative["long"][1]
    long = long_prompts(tokenizer)
    lengths = [len(p) + len(t) for p, t in zip(long, outputs, strict=True)]
    assert lengths == [MAX_MODEL_LEN] * NUM_SMALL  # every request ran into the limit
    assert_same(baseline["stopped"], speculative["stopped"], "stop strings")
    cut = sum(len(t) < MAX_TOKENS for t in speculative["stopped"])
    assert cut >= NUM_PROMPTS // 2, speculative["stops"]
    # EOS inside drafts: short answers end on EOS; the second time history drafts it.
    for i in range(2):
        assert_same(baseline["eos"][i], speculative["eos"][i], f"EOS in drafts ({i + 1})")
    eos = tokenizer.eos_token_id
    assert all(len(t) < MAX_TOKENS and t[-1] == eos for t in speculative["eos"][1])


# ---------------------------------------------------------------------------------- aborts
def test_aborted_requests_leave_no_trace(baseline, speculative) -> None:
    finished, aborted = speculative["aborts"]
    expected = baseline["greedy"][0]
    assert len(aborted) == NUM_PROMPTS * NUM_SAMPLES // ABORTED_SHARE
    for request_id, tokens in finished.items():
        assert tokens == expected[int(request_id.split("-")[1])], request_id
    assert len(finished) + len(aborted) == NUM_PROMPTS * NUM_SAMPLES
    before, after = speculative["before_aborts"], speculative["after_aborts"]
    assert after["num_running"] == 0
    assert delta(after, before, "num_aborted") == len(aborted)
    assert delta(after, before, "num_finished") == len(finished)
    # Only the survivors entered history (under keys no other request used), whole.
    history, earlier = after["history"], before["history"]
    assert history["num_rollouts"] - earlier["num_rollouts"] == len(finished)
    survivor_tokens = sum(map(len, finished.values()))
    assert history["num_prompt_tokens"] - earlier["num_prompt_tokens"] == survivor_tokens
    # The forest holds exactly history's sequences: nothing of the aborted requests is left.
    assert speculative["integrity_after_aborts"] is None


# ----------------------------------------------------------------------------- wrong drafts
@pytest.mark.parametrize("mode", [mode for mode, _ in FAULTS])
def test_wrong_drafts_never_change_outputs(baseline, speculative, mode: str) -> None:
    tokens, before, after, fault = speculative["faults"][mode]
    expected = [t[:FAULT_MAX_TOKENS] for t in baseline["greedy"][0][::NUM_SAMPLES]]
    assert_same(expected, tokens, f"fault {mode}")
    # vLLM's counters: what it verified and accepted (the drafter counts its own drafts).
    drafts = {key: after["vllm"][key] - before["vllm"][key] for key in after["vllm"]}
    logger.info("fault %s: vLLM counters %s, fault %s", mode, drafts, fault)
    if mode in ("random", "shifted"):
        # Greedy history drafts are ~all accepted (test above); wrong ones almost never.
        assert drafts["num_draft_tokens"] > 200
        assert drafts["num_accepted_tokens"] < 0.05 * drafts["num_draft_tokens"]
    if mode == "out_of_vocab":  # every draft is cut before its second token
        assert 0 < drafts["num_draft_tokens"] <= drafts["num_drafts"]
    if mode == "raise":
        failures = delta(after["drafter"][0], before["drafter"][0], "num_proposer_failures")
        assert fault["num_raised"] >= 3 and failures == fault["num_raised"]
        assert not after["drafter"][0]["disabled"]


def test_drafter_consistent_after_everything(speculative) -> None:
    final = speculative["final"]
    assert final["num_running"] == 0
    assert speculative["integrity"] is None
