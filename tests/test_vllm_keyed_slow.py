"""Position-keyed sampling end to end: seeded rollouts identical with and without DAS (slow).

Two engines on the default model in float32, one after the other: an engine without speculation
(vLLM's default scheduling), then a DAS engine (K=4, a fixed policy: the most drafts). Each runs
the same RL-shaped workload: NUM_STEPS generate() calls ("steps") of NUM_PROMPTS GSM8K prompts,
each prompt sampled NUM_SAMPLES times position-keyed (a fresh seed per sample and step). Step 2
also samples each prompt once seeded but unkeyed (the control: vLLM's own seeded sampling, whose
random stream depends on the drafts; it also makes step 2 a mixed batch); steps 1 and 3 are keyed
only, so their speculation counters count keyed rows alone. From step 2 on, DAS also drafts from
earlier steps' rollouts.

    pytest -m slow tests/test_vllm_keyed_slow.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import logging
import time

import pytest

from das.default_model import resolve_model
from das.vllm.api import das_llm, spec_decode_counters
from das.vllm.engine import chat_prompt_token_ids, make_llm, shutdown_llm
from das.vllm.keyed import position_keyed_params
from rollouts.prompts import format_gsm8k_messages, load_prompts

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

NUM_PROMPTS = 8
NUM_SAMPLES = 2
NUM_STEPS = 3
CONTROL_STEP = 1  # only step 2 mixes in unkeyed requests: step 3's drafts are all keyed rows
MAX_TOKENS = 64
K = 4
ENGINE = {"dtype": "float32", "max_model_len": 1024, "kv_cache_gib": 2.0, "seed": 0}
DAS = {"policy": "fixed"}
CONFIGS = {  # name -> sampling parameters
    "T=1.0": {"temperature": 1.0},
    "T=0.6 top_p=0.9": {"temperature": 0.6, "top_p": 0.9},
}


def seed_of(config: int, step: int, prompt: int, sample: int) -> int:
    return 100_000 * config + 1000 * step + 10 * prompt + sample


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    rows = load_prompts(None, NUM_PROMPTS, seed=0)
    return [chat_prompt_token_ids(tokenizer, format_gsm8k_messages(row.text)) for row in rows]


def run_workload(llm, prompts: list[list[int]], label: str) -> dict:
    """{config: [per step: (keyed outputs, control outputs, counter deltas, keyed logprobs)]}."""
    from vllm import SamplingParams

    results: dict[str, list] = {}
    for c, (name, sampling) in enumerate(CONFIGS.items()):
        results[name] = []
        for step in range(NUM_STEPS):
            batch, params = [], []
            for p, prompt in enumerate(prompts):
                for sample in range(NUM_SAMPLES):
                    batch.append({"prompt_token_ids": prompt})
                    params.append(
                        position_keyed_params(
                            seed_of(c, step, p, sample),
                            max_tokens=MAX_TOKENS,
                            logprobs=0,  # the sampled token's: how far the two engines' logits are
                            **sampling,
                        )
                    )
                if step == CONTROL_STEP:  # the control: seeded, not keyed
                    batch.append({"prompt_token_ids": prompt})
                    params.append(
                        SamplingParams(
                            seed=seed_of(c, step, p, 9), max_tokens=MAX_TOKENS, **sampling
                        )
                    )
            before = spec_decode_counters(llm)
            started = time.perf_counter()
            outputs = llm.generate(batch, params, use_tqdm=False)
            after = spec_decode_counters(llm)
            tokens = [list(output.outputs[0].token_ids) for output in outputs]
            keyed = [t for t, s in zip(tokens, params, strict=True) if s.extra_args]
            logprobs = [
                [
                    entry[token].logprob
                    for token, entry in zip(t, o.outputs[0].logprobs, strict=True)
                ]
                for t, o, s in zip(tokens, outputs, params, strict=True)
                if s.extra_args
            ]
            control = [t for t, s in zip(tokens, params, strict=True) if not s.extra_args]
            counters = {key: after[key] - before[key] for key in after}
            logger.info(
                "%s %s step %d: %.1f s, %d keyed tokens, drafts %s",
                label,
                name,
                step + 1,
                time.perf_counter() - started,
                sum(map(len, keyed)),
                counters,
            )
            results[name].append((keyed, control, counters, logprobs))
    return results


@pytest.fixture(scope="module")
def baseline(prompts) -> dict:
    llm = make_llm(None, **ENGINE)
    try:
        return run_workload(llm, prompts, "no speculation")
    finally:
        shutdown_llm(llm)


@pytest.fixture(scope="module")
def speculative(prompts, baseline) -> dict:  # after the baseline: never two engines at once
    llm = das_llm(None, das=DAS, num_speculative_tokens=K, **ENGINE)
    try:
        return run_workload(llm, prompts, "DAS")
    finally:
        shutdown_llm(llm)


def first_difference(a: list[int], b: list[int]) -> int:
    """The first index where two token lists differ (their common length if one is a prefix)."""
    return next(
        (j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


@pytest.mark.parametrize("config", list(CONFIGS))
def test_keyed_rollouts_identical_with_and_without_das(baseline, speculative, config) -> None:
    identical, mismatched, logprob_gap = 0, [], 0.0
    for step, ((expected, _, _, lp_a), (got, _, _, lp_b)) in enumerate(
        zip(baseline[config], speculative[config], strict=True), start=1
    ):
        assert len(got) == len(expected) == NUM_PROMPTS * NUM_SAMPLES
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            if a == b:
                identical += len(a)
                gaps = [abs(x - y) for x, y in zip(lp_a[i], lp_b[i], strict=True)]
                logprob_gap = max([logprob_gap, *gaps])
            else:
                mismatched.append((step, i, first_difference(a, b), len(a), len(b)))
    logger.info(
        "%s: %d keyed tokens identical, mismatches %s; largest logprob gap between the engines "
        "%.3g",
        config,
        identical,
        mismatched,
        logprob_gap,
    )
    assert not mismatched, f"(step, rollout, first differing token, lengths): {mismatched}"
    assert identical > NUM_STEPS * NUM_PROMPTS * NUM_SAMPLES * 8  # not trivially short


@pytest.mark.parametrize("config", list(CONFIGS))
def test_drafts_were_verified_and_accepted(speculative, config) -> None:
    """Identity is not vacuous: DAS drafted and drafts were accepted in every step, in steps 1
    and 3 by keyed rows alone (a wrong accept would then show up as a difference above)."""
    for step, (_, _, counters, _) in enumerate(speculative[config], start=1):
        logger.info("%s step %d: %s", config, step, counters)
        assert counters["num_draft_tokens"] > 0
        assert counters["num_accepted_tokens"] > 0


@pytest.mark.parametrize("config", list(CONFIGS))
def test_seeds_matter(baseline, config) -> None:
    """Not greedy in disguise: the two keyed samples of a prompt (two seeds) differ."""
    for keyed, _, _, _ in baseline[config]:
        pairs = [keyed[i : i + NUM_SAMPLES] for i in range(0, len(keyed), NUM_SAMPLES)]
        differing = sum(a != b for a, b in pairs)
        assert differing >= NUM_PROMPTS - 1, (config, differing)


def test_unkeyed_seeded_control_differs(baseline, speculative) -> None:
    """The same seeds without the option: vLLM's seeded stream depends on what was drafted, so
    rollouts differ between the engines; it is the keying that makes them identical."""
    differing = total = 0
    for config in CONFIGS:
        (_, expected, _, _), (_, got, _, _) = (
            baseline[config][CONTROL_STEP],
            speculative[config][CONTROL_STEP],
        )
        assert len(expected) == len(got) == NUM_PROMPTS
        differing += sum(a != b for a, b in zip(expected, got, strict=True))
        total += len(expected)
    logger.info("unkeyed seeded control: %d of %d rollouts differ", differing, total)
    assert differing >= total // 2
