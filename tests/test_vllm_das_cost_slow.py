"""DAS with its default budget policy (cost model fitted online) in a real vLLM engine (slow).

One engine: the same prompts decoded greedily in three RL steps. Step 1 drafts little (no
history yet), steps 2 and 3 draft from history, so equal outputs across the steps show that the
budgets the policy chose never changed a token; the fitter must have seen the engine's steps.
"""

from __future__ import annotations

import gc
import logging
import time

import pytest

from das.default_model import resolve_model
from das.vllm.api import das_llm, das_stats
from das.vllm.engine import chat_prompt_token_ids
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
        return outputs, stats
    finally:
        llm.llm_engine.engine_core.shutdown()
        gc.collect()


def test_cost_model_policy_keeps_outputs_and_fits_step_times(runs) -> None:
    outputs, stats = runs
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    final = stats[-1]
    logger.info(
        "cost model %s from %d steps; %d/%d draft tokens accepted",
        final["cost_model"],
        final["num_cost_observations"],
        final["num_accepted_tokens"],
        final["num_draft_tokens"],
    )
    assert final["num_cost_observations"] >= 20
    assert final["cost_model"]["c_base"] + final["cost_model"]["c_tok"] > 0
    assert stats[1]["num_accepted_tokens"] > stats[0]["num_accepted_tokens"]
    assert stats[2]["num_accepted_tokens"] > stats[1]["num_accepted_tokens"]
    assert final["num_proposer_failures"] == 0 and final["num_drafter_failures"] == 0
