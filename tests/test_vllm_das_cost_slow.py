"""DAS with its default budget policy (cost model fitted online) in a real vLLM engine (slow).

The same prompts decoded greedily in three RL steps by a DAS engine, then once by an engine
without speculation (float32, so greedy outputs compare exactly). Step 1 drafts little (no
history yet), steps 2 and 3 draft from history. The cost-model policy drafts for some rows and
not others, and not in every engine step, so these runs cross all three of vLLM's paths that
DAS's plugin patches or relies on: steps where no row drafts (plain sampling through the
speculative runner), steps where only some rows draft, and steps where drafts are verified.
Every DAS step must equal the plain engine's output token for token.
"""

from __future__ import annotations

import logging
import time

import pytest

from das.default_model import resolve_model
from das.vllm.api import das_llm, das_stats
from das.vllm.engine import chat_prompt_token_ids, make_llm, shutdown_llm
from rollouts.prompts import format_gsm8k_messages, load_prompts

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

NUM_PROMPTS = 16
NUM_STEPS = 3
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def runs():
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    prompts = [
        {"prompt_token_ids": chat_prompt_token_ids(tokenizer, format_gsm8k_messages(row.text))}
        for row in load_prompts(None, NUM_PROMPTS, seed=1)
    ]
    llm = das_llm(None, num_speculative_tokens=8, dtype="float32", max_model_len=1024)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        outputs, stats = [], []
        for step in range(NUM_STEPS):
            started = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            logger.info("cost-model step %d: %.1f s", step + 1, time.perf_counter() - started)
            outputs.append([list(r.outputs[0].token_ids) for r in results])
            stats.append(das_stats(llm)["drafter"][0])
    finally:
        shutdown_llm(llm)
    plain = make_llm(None, dtype="float32", max_model_len=1024, async_scheduling=False)
    try:
        baseline = [
            list(r.outputs[0].token_ids) for r in plain.generate(prompts, params, use_tqdm=False)
        ]
    finally:
        shutdown_llm(plain)
    return outputs, stats, baseline


def test_cost_model_policy_outputs_equal_a_plain_engine_in_every_step(runs) -> None:
    outputs, stats, baseline = runs
    for step, tokens in enumerate(outputs):
        mismatched = [i for i, (a, b) in enumerate(zip(tokens, baseline, strict=True)) if a != b]
        assert not mismatched, f"step {step + 1}: prompts {mismatched} differ from the plain engine"
    final = stats[-1]
    # All three paths were crossed: no draft at all, some rows drafted, drafts verified.
    assert final["num_steps"] > final["num_spec_steps"] > 0
    assert final["num_partial_spec_steps"] > 0
    logger.info(
        "cost model %s from %d steps; %d/%d draft tokens accepted",
        final["cost_model"],
        final["num_cost_observations"],
        final["num_accepted_tokens"],
        final["num_draft_tokens"],
    )
    logger.info(
        "engine steps %d, with drafts %d, partly drafted %d",
        final["num_steps"],
        final["num_spec_steps"],
        final["num_partial_spec_steps"],
    )
    assert final["num_cost_observations"] >= 20
    assert final["cost_model"]["c_base"] + final["cost_model"]["c_tok"] > 0
    assert stats[1]["num_accepted_tokens"] > stats[0]["num_accepted_tokens"]
    assert stats[2]["num_accepted_tokens"] > stats[1]["num_accepted_tokens"]
    assert final["num_proposer_failures"] == 0 and final["num_drafter_failures"] == 0
    # By default the engine's drafter times its lookups; beside a CPU engine's steps they are
    # a small share, so no batch was skipped for them.
    assert final["lookup_us_by_band"] and all(us > 0 for us in final["lookup_us_by_band"].values())
    assert final["num_gated_batches"] == 0
