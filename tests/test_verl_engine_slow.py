"""vLLM engines built from exactly the engine arguments verl 0.9.1 derives from its config.

verl's rollout server is a Ray actor on a GPU node and cannot run here; its argument builder
(``vLLMHttpServer.launch_server``) does, through :func:`das.verl.hook.verl_vllm_engine_args`.
Each engine below is built from those arguments, and its requests are what verl's agent loop
sends (the DAS agent loop, with a mock server manager capturing the requests) turned into
``SamplingParams`` as verl's server does. Two engines, one after the other: DAS (from the
``das_grpo`` recipe) as verl's server runs it, an ``AsyncLLM`` read through DAS's server RPC
(``DASvLLMHttpServer.das_stats``); then ``vllm.LLM`` from the same config without DAS. Float32,
so greedy outputs compare exactly.

    pytest -m slow tests/test_verl_engine_slow.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl")

from das.default_model import ensure_default_model
from das.verl.hook import (
    compose_verl_config,
    das_rollout_metrics,
    engine_kwargs_from_args,
    verl_vllm_engine_args,
)
from das.vllm.engine import shutdown_llm
from rollouts.prompts import format_gsm8k_messages, load_prompts

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

NUM_PROMPTS = 8
GROUP = 4  # rollout.n
RESPONSE_LENGTH = 64
GREEDY_CUTS = (16, 32, 48, 64)  # per-sample max_tokens in the greedy group: distinct rewards
CPU_OVERRIDES = [
    "trainer.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "actor_rollout_ref.rollout.name=vllm",
    f"actor_rollout_ref.rollout.n={GROUP}",
    "actor_rollout_ref.rollout.load_format=auto",  # verl's default (dummy) waits for a weight sync
    "actor_rollout_ref.rollout.dtype=float32",
    "actor_rollout_ref.rollout.enforce_eager=true",
    "actor_rollout_ref.rollout.max_model_len=1024",
    f"data.max_response_length={RESPONSE_LENGTH}",
    "+actor_rollout_ref.rollout.enable_sleep_mode=false",  # needs CUDA
    "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=2147483648",
]


class CapturingServerManager:
    """Mock of verl's LLMServerClient (Ray): keeps each request instead of sending it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def generate(self, **kwargs: Any):
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append(kwargs)
        return TokenOutput(token_ids=[0], log_probs=None, extra_fields={})


def agent_loop_requests(config, prompts, sampling_params: list[dict[str, Any]]) -> list[dict]:
    """The (prompt_ids, sampling_params) verl's DAS agent loop sends for each sample."""
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from das.verl.agent_loop import DASSingleTurnAgentLoop

    manager = CapturingServerManager()

    async def run_all() -> None:
        loop = DASSingleTurnAgentLoop(
            trainer_config=DictConfigWrap(config),
            server_manager=manager,
            tokenizer=AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.path),
            processor=None,
            dataset_cls=RLHFDataset,
            data_config=DictConfigWrap(config.data),
        )
        for prompt in prompts:
            for params in sampling_params:
                await loop.run(
                    params,
                    raw_prompt=format_gsm8k_messages(prompt.text),
                    extra_info={"index": prompt.index, "split": "train"},
                    data_source="openai/gsm8k",
                )

    asyncio.run(run_all())
    return manager.requests


def to_vllm(request: dict[str, Any], response_length: int) -> tuple[Any, Any]:
    """As verl's vLLMHttpServer.generate builds a request (vllm_async_server.py, 0.9.1)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = dict(request["sampling_params"])
    max_tokens = params.pop("max_tokens", response_length)
    params["logprobs"] = 0 if params.pop("logprobs", False) else None
    params.setdefault("repetition_penalty", 1.0)
    params.setdefault("ignore_eos", False)
    sampling = SamplingParams(max_tokens=max_tokens, **params)
    return TokensPrompt(prompt_token_ids=list(request["prompt_ids"])), sampling


def generate(llm, requests: list[dict], response_length: int) -> list[list[int]]:
    inputs, params = zip(*(to_vllm(r, response_length) for r in requests), strict=True)
    outputs = llm.generate(list(inputs), list(params), use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


async def generate_async(engine, requests: list[dict], response_length: int) -> list[list[int]]:
    """All requests at once through an ``AsyncLLM``, as verl's rollout server sends them."""

    async def one(number: int, request: dict) -> list[int]:
        prompt, params = to_vllm(request, response_length)
        final = None
        async for output in engine.generate(prompt, params, request_id=f"req-{number}"):
            final = output
        return list(final.outputs[0].token_ids)

    return list(await asyncio.gather(*(one(n, r) for n, r in enumerate(requests))))


async def run_das_server(engine_args, sampled: list[dict], greedy: list[dict]) -> dict[str, Any]:
    """Two sampled steps and a greedy one on DAS's rollout server; its stats around each."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from das.verl.server import DASvLLMHttpServer

    class WorkersWithoutStats(DASvLLMHttpServer):
        STATS_RPC = "no_such_worker_method"  # as a worker without DAS's extension answers

    server = object.__new__(DASvLLMHttpServer)  # verl's constructor needs a Ray actor context
    server.engine = AsyncLLM.from_engine_args(engine_args)  # as verl's server starts it
    try:
        snapshots = [await server.das_stats()]
        for _ in range(2):
            await generate_async(server.engine, sampled, RESPONSE_LENGTH)
            snapshots.append(await server.das_stats())
        greedy_tokens = await generate_async(server.engine, greedy, RESPONSE_LENGTH)
        snapshots.append(await server.das_stats())
        without_stats = object.__new__(WorkersWithoutStats)
        without_stats.engine = server.engine
        missing_rpc = await without_stats.das_stats()
    finally:
        server.engine.shutdown()
        gc.collect()
    return {"tokens": greedy_tokens, "stats": snapshots, "missing_rpc": missing_rpc}


def start_engine(config):
    import vllm

    engine_args = verl_vllm_engine_args(config)
    return vllm.LLM(**engine_kwargs_from_args(engine_args))


def sampling_dicts(config, greedy: bool) -> list[dict[str, Any]]:
    """verl's per-request sampling dict (AgentLoopWorker.generate_sequences), one per sample."""
    rollout = config.actor_rollout_ref.rollout
    base = {
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "top_k": rollout.top_k,
        "repetition_penalty": 1.0,
        "logprobs": rollout.calculate_log_probs,
    }
    if not greedy:
        return [base] * GROUP
    greedy_base = {**base, "temperature": rollout.val_kwargs.temperature, "top_p": 1.0, "top_k": -1}
    return [{**greedy_base, "max_tokens": cut} for cut in GREEDY_CUTS]


def grpo_advantages(tokenizer, prompts, responses: list[list[int]]) -> np.ndarray:
    """GRPO advantages (verl's function) of the greedy groups, rewarded with verl's GSM8K score."""
    import torch
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.utils.reward_score.gsm8k import compute_score

    mask = torch.zeros(len(responses), RESPONSE_LENGTH)
    rewards = torch.zeros_like(mask)
    index = []
    for row, tokens in enumerate(responses):
        prompt = prompts[row // GROUP]
        mask[row, : len(tokens)] = 1
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        truth = (prompt.answer or "").split("####")[-1].strip()
        # verl's GSM8K score minus a length penalty (as DAPO's overlong shaping), so that the
        # group's samples, cut at different lengths, get different rewards.
        score = compute_score(text, truth, method="flexible", format_score=0.1)
        rewards[row, max(len(tokens) - 1, 0)] = score - 0.5 * len(tokens) / RESPONSE_LENGTH
        index.append(str(prompt.index))
    advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=mask, index=np.array(index, dtype=object)
    )
    return advantages.numpy()


@pytest.fixture(scope="module")
def configs():
    model = str(ensure_default_model())
    common = [f"actor_rollout_ref.model.path={model}", *CPU_OVERRIDES]
    # The fixed policy drafts every iteration: the plumbing is what is tested here (the
    # cost-model policy may rightly draft nothing on this CPU; see README, live rollouts).
    das = compose_verl_config([*common, "das.num_speculative_tokens=8", "das.policy=fixed"])
    plain = compose_verl_config(
        [*common, "algorithm.adv_estimator=grpo"], config_name="ppo_trainer"
    )
    return das, plain


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(None, NUM_PROMPTS)


@pytest.fixture(scope="module")
def das_run(configs, prompts):
    """DAS engine: two steps with verl's rollout sampling, then a greedy step; stats per step."""
    das_config, _ = configs
    sampled = agent_loop_requests(das_config, prompts, sampling_dicts(das_config, False))
    greedy = agent_loop_requests(das_config, prompts, sampling_dicts(das_config, True))
    engine_args = verl_vllm_engine_args(das_config)  # runs its own event loop
    result = asyncio.run(run_das_server(engine_args, sampled, greedy))
    return {"sampled": sampled, "greedy": greedy, **result}


def test_verl_requests_carry_dataset_index_prompt_keys(das_run, prompts) -> None:
    keys = [r["sampling_params"]["extra_args"]["das_prompt_key"] for r in das_run["sampled"]]
    assert keys == [f"openai/gsm8k:{p.index}" for p in prompts for _ in range(GROUP)]


def test_das_engine_from_verl_args_accepts_history_drafts_at_step_two(das_run) -> None:
    stats = das_run["stats"]
    step_one = das_rollout_metrics(stats[0], stats[1])
    step_two = das_rollout_metrics(stats[1], stats[2])
    logger.info("step 1: %s", step_one)
    logger.info("step 2: %s", step_two)
    worker = stats[2][0]
    assert worker["step"] >= 1 and worker["history"]["num_rollouts"] > 0
    assert step_two["rollout/das_accepted_tokens"] > 0
    assert step_two["rollout/das_accept_len"] > 1.0
    before, after = stats[1][0]["tokens_by_source"], stats[2][0]["tokens_by_source"]
    assert after["prompt"] > before["prompt"]  # drafts from the prompt's history
    assert worker["num_proposer_failures"] == 0


def test_a_failing_stats_call_on_a_real_engine_reaches_the_trainer_as_no_stats(das_run) -> None:
    """The worker call fails inside a real ``AsyncLLM``; the server must not raise."""
    assert das_run["missing_rpc"] == []


def test_greedy_rollouts_identical_with_and_without_das(configs, das_run, prompts) -> None:
    from transformers import AutoTokenizer

    _, plain_config = configs
    greedy_stats = das_rollout_metrics(das_run["stats"][2], das_run["stats"][3])
    assert greedy_stats["rollout/das_accepted_tokens"] > 0  # DAS drafts were verified
    llm = start_engine(plain_config)
    try:
        assert llm.llm_engine.vllm_config.speculative_config is None
        baseline_tokens = generate(llm, das_run["greedy"], RESPONSE_LENGTH)
    finally:
        shutdown_llm(llm)
    assert das_run["tokens"] == baseline_tokens
    # The groups' GRPO advantages (verl's own function and GSM8K reward) are not all zero, so
    # the identical tokens above mean identical, non-trivial training signal.
    tokenizer = AutoTokenizer.from_pretrained(plain_config.actor_rollout_ref.model.path)
    assert np.abs(grpo_advantages(tokenizer, prompts, das_run["tokens"])).sum() > 0
