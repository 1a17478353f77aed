"""DAS inside a real vLLM 0.32 engine on the default model (slow: each engine starts in minutes).

Two engines, one after the other, never at once: a baseline without speculation (same V1 model
runner, synchronous scheduling as speculation forces), then one DAS engine that every other test
shares, in file order (history accumulates; the seed test runs last because without its fix
the engine dies). float32 throughout, so greedy outputs can be compared token for token.

    pytest -m slow tests/test_vllm_das_slow.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from das.default_model import resolve_model
from das.vllm.api import das_llm, das_stats
from das.vllm.engine import chat_prompt_token_ids, make_llm, shutdown_llm
from rollouts.prompts import format_gsm8k_messages, load_prompts

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

NUM_PROMPTS = 32
NUM_SAMPLES = 2  # greedy forbids n > 1: each prompt is submitted twice
NUM_STEPS = 3
MAX_TOKENS = 64
K = 4
ENGINE = {"dtype": "float32", "max_model_len": 1024, "kv_cache_gib": 2.0, "seed": 0}
DAS = {"policy": "fixed"}  # always K: the most drafts, the strongest test of correctness

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 3 + "1, 2, 3,"
# The model continues " the" (p~0.9), then the next token is uncertain (park ~0.24,
# store ~0.21, ...) while the request's own context drafts " park" or " store".
AMBIGUOUS = "Alice went to the park. Bob went to the store. Carol went to"


def timed(label: str, action: Callable[[], object]) -> object:
    started = time.perf_counter()
    result = action()
    logger.info("%s: %.1f s", label, time.perf_counter() - started)
    return result


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(None))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    rows = load_prompts(None, NUM_PROMPTS, seed=0)
    return [chat_prompt_token_ids(tokenizer, format_gsm8k_messages(row.text)) for row in rows]


def run_greedy_steps(llm, prompts: list[list[int]], label: str, after_step=None) -> list:
    """NUM_STEPS generate() calls (one per RL step) of every prompt NUM_SAMPLES times."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    batch = [{"prompt_token_ids": p} for p in prompts for _ in range(NUM_SAMPLES)]
    steps = []
    for step in range(NUM_STEPS):
        outputs = timed(
            f"{label} step {step + 1}", lambda: llm.generate(batch, params, use_tqdm=False)
        )
        steps.append([list(output.outputs[0].token_ids) for output in outputs])
        if after_step is not None:
            after_step()
    return steps


@pytest.fixture(scope="module")
def baseline(prompts) -> list:
    """Greedy outputs of an engine without speculation (started and stopped here)."""
    llm = timed("baseline start", lambda: make_llm(None, async_scheduling=False, **ENGINE))
    try:
        return run_greedy_steps(llm, prompts, "baseline")
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def llm():
    engine = timed("DAS start", lambda: das_llm(None, das=DAS, num_speculative_tokens=K, **ENGINE))
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def das_greedy(llm, prompts) -> tuple[list, list]:
    stats: list[dict] = []
    outputs = run_greedy_steps(llm, prompts, "DAS", lambda: stats.append(das_stats(llm)))
    return outputs, stats


def drafter(stats: dict) -> dict:
    (worker,) = stats["drafter"]
    return worker


def delta(after: dict, before: dict | None, key: str) -> int:
    return drafter(after)[key] - (drafter(before)[key] if before else 0)


# ------------------------------------------------------------------------ greedy identity
def test_greedy_outputs_identical_with_and_without_das(baseline, das_greedy) -> None:
    outputs, _ = das_greedy
    for step, (expected, got) in enumerate(zip(baseline, outputs, strict=True)):
        mismatched = [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
        assert not mismatched, f"step {step + 1}: requests {mismatched} differ"
    assert len(outputs[0]) == NUM_PROMPTS * NUM_SAMPLES


def test_history_drafts_accepted_in_later_steps(das_greedy) -> None:
    _, stats = das_greedy
    previous = None
    for step, current in enumerate(stats, start=1):
        accepted = delta(current, previous, "num_accepted_tokens")
        drafted = delta(current, previous, "num_draft_tokens")
        wins = drafter(current)["wins_by_source"]
        logger.info("step %d: %d/%d draft tokens accepted, wins %s", step, accepted, drafted, wins)
        if step >= 2:
            from_history = sum(
                drafter(current)["tokens_by_source"][source]
                - (drafter(previous)["tokens_by_source"][source] if previous else 0)
                for source in ("prompt", "global")
            )
            assert accepted > 0 and from_history > 0
        previous = current
    final = drafter(stats[-1])
    # The drafter's own count of accepted tokens is vLLM's (same drafts, same verification).
    # Draft counts differ both ways: vLLM pads a new request whose prompt is cached up to its
    # last token to 1 + K tokens with -1 "drafts" (never accepted; scheduler.py:1131), and a
    # draft proposed in the step a request samples its stop token is never scheduled (at most
    # one draft of K tokens per finished request).
    assert final["num_accepted_tokens"] == stats[-1]["vllm"]["num_accepted_tokens"]
    unscheduled = K * final["num_finished"]
    assert final["num_draft_tokens"] <= stats[-1]["vllm"]["num_draft_tokens"] + unscheduled
    assert final["history"]["num_rollouts"] == NUM_STEPS * NUM_PROMPTS * NUM_SAMPLES
    assert final["step"] == NUM_STEPS and final["num_running"] == 0
    assert final["num_proposer_failures"] == 0 and final["num_drafter_failures"] == 0


# ----------------------------------------------------------------------------- bad input
def test_unknown_das_key_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="bogus_key"):
        das_llm(None, das={"bogus_key": 1}, num_speculative_tokens=K, **ENGINE)


# ---------------------------------------------------------------------------- sampling
def test_sampling_with_drafts_keeps_acceptance(llm, tokenizer) -> None:
    """Fails without the expand-kernel fix: draft positions then sample at garbage temperatures
    and acceptance falls to about 1% (docs/vllm-cpu.md)."""
    from vllm import SamplingParams

    before = das_stats(llm)
    prompt = {"prompt_token_ids": tokenizer.encode(COUNTING)}
    params = SamplingParams(n=16, temperature=1.0, max_tokens=48)
    (output,) = timed("counting T=1", lambda: llm.generate([prompt], params, use_tqdm=False))
    after = das_stats(llm)
    drafted = delta(after, before, "num_draft_tokens")
    accepted = delta(after, before, "num_accepted_tokens")
    logger.info("T=1.0 counting: %d/%d draft tokens accepted", accepted, drafted)
    assert drafted >= 100
    assert accepted / drafted > 0.5
    continuing = sum(c.text.startswith(" 4, 5, 6") for c in output.outputs)
    assert continuing >= 12


def chi_square(samples: Counter, probs: dict[int, float]) -> tuple[float, int, float]:
    """Pearson statistic, degrees of freedom and total variation of ``samples`` against
    ``probs`` (categories expected at least 5 times; the rest pooled as one)."""
    total = sum(samples.values())
    kept = [token for token, p in probs.items() if p * total >= 5]
    observed = [samples[token] for token in kept]
    expected = [probs[token] * total for token in kept]
    observed.append(total - sum(observed))
    expected.append(total - sum(expected))
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 0)
    variation = 0.5 * sum(abs(o - e) for o, e in zip(observed, expected, strict=True)) / total
    return statistic, len(kept), variation


def chi_square_quantile(degrees: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.719: 1 - 1e-4)."""
    a = 2.0 / (9.0 * degrees)
    return degrees * (1.0 - a + z * math.sqrt(a)) ** 3


def model_probs(llm, prompt_tokens: list[int]) -> dict[int, float]:
    """Top-20 next-token probabilities of the model (raw logprobs = the T=1.0 distribution)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=1, logprobs=20)
    (output,) = llm.generate([{"prompt_token_ids": prompt_tokens}], params, use_tqdm=False)
    return {token: math.exp(lp.logprob) for token, lp in output.outputs[0].logprobs[0].items()}


def test_sampled_distribution_matches_model(llm, tokenizer) -> None:
    """Tokens verified against a draft follow the model's softmax (rejection sampling)."""
    from vllm import SamplingParams

    prompt = tokenizer.encode(AMBIGUOUS)
    before = das_stats(llm)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=3)
    outputs = timed(
        "distribution T=1",
        lambda: llm.generate([{"prompt_token_ids": prompt}] * 400, params, use_tqdm=False),
    )
    after = das_stats(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    first = Counter(t[0] for t in tokens)
    mode = first.most_common(1)[0][0]
    second = Counter(t[1] for t in tokens if t[0] == mode and len(t) > 1)
    drafted = delta(after, before, "num_draft_tokens")
    logger.info("first-token mode %r, %d draft tokens", tokenizer.decode([mode]), drafted)
    assert drafted >= 0.8 * sum(second.values())  # the second token went through verification
    for name, samples, probs in (
        ("first token (no draft)", first, model_probs(llm, prompt)),
        ("second token (drafted)", second, model_probs(llm, [*prompt, mode])),
    ):
        statistic, degrees, variation = chi_square(samples, probs)
        logger.info(
            "%s: chi2=%.1f df=%d (limit %.1f), TV=%.3f over %d samples",
            name,
            statistic,
            degrees,
            chi_square_quantile(degrees),
            variation,
            sum(samples.values()),
        )
        assert statistic < chi_square_quantile(degrees), name
        assert variation < 0.12, name


# -------------------------------------------------------------------- requests that fail
def test_bad_requests_and_aborts_keep_history_consistent(llm, prompts) -> None:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(VLLMValidationError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], SamplingParams(max_tokens=4))
    before = drafter(das_stats(llm))
    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=48, extra_args={"das_step": 1000, "das_prompt_key": "abort"}
    )
    engine.add_request("keep", {"prompt_token_ids": prompts[0]}, params)
    engine.add_request("drop", {"prompt_token_ids": prompts[1]}, params)
    finished = {}
    for iteration in range(500):
        if not engine.has_unfinished_requests():
            break
        if iteration == 3:
            engine.abort_request(["drop"])
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    keep = finished["keep"].outputs[0].token_ids
    for _ in range(20):  # the worker hears of the last finish one engine step later
        after = drafter(das_stats(llm))
        if after["num_running"] == 0:
            break
        time.sleep(0.5)
    assert after["num_running"] == 0
    assert after["num_aborted"] - before["num_aborted"] == 1
    assert after["num_finished"] - before["num_finished"] == 1
    assert after["step"] == 1000
    # "keep" entered history once, "drop" (aborted) not at all. Other prompts keep their last
    # appearances whatever the step number; the global tree's window of steps now holds only
    # step 1000's rollout.
    history, earlier = after["history"], before["history"]
    assert history["num_rollouts"] - earlier["num_rollouts"] == 1
    assert history["num_prompt_tokens"] - earlier["num_prompt_tokens"] == len(keep)
    assert history["num_global_tokens"] == len(keep)
    assert after["num_proposer_failures"] == 0
    outputs = llm.generate(
        [{"prompt_token_ids": prompts[2]}], SamplingParams(max_tokens=8), use_tqdm=False
    )
    assert len(outputs[0].outputs[0].token_ids) == 8


# ---------------------------------------------------------------------- per-request seeds
def test_per_request_seeds(llm) -> None:
    """Seeded sampling works, and a request whose prefill was split (its first sample discarded
    and its generator rewound) draws the same first token as when it runs alone."""
    from vllm import SamplingParams

    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(1000, 20000, 300).tolist()} for _ in range(32)]
    assert 32 * 300 > 4096  # more than one step's token budget: some prefill is split
    params = [SamplingParams(temperature=1.0, max_tokens=1, seed=100 + i) for i in range(32)]
    together = timed("seeded batch", lambda: llm.generate(prompts, params, use_tqdm=False))
    alone = [
        llm.generate([p], [s], use_tqdm=False)[0] for p, s in zip(prompts, params, strict=True)
    ]
    first_together = [o.outputs[0].token_ids[0] for o in together]
    first_alone = [o.outputs[0].token_ids[0] for o in alone]
    assert first_together == first_alone
    longer = [
        SamplingParams(temperature=1.0, max_tokens=16, seed=100 + i, ignore_eos=True)
        for i in range(32)
    ]
    outputs = timed("seeded decode", lambda: llm.generate(prompts, longer, use_tqdm=False))
    assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    assert drafter(das_stats(llm))["num_proposer_failures"] == 0
