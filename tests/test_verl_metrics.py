"""DAS's rollout metrics reach verl 0.9.1's v0 trainer metrics: replica, manager, trainer hook.

verl's rollout servers are Ray actors on GPU nodes and cannot run here. The Ray handles of the
servers, router and agent-loop workers are mocks (``MockRayHandle``) that call the real object
behind them; every verl function and class used is verl's own. The server's ``das_stats`` on a
real vLLM engine is in ``tests/test_verl_engine_slow.py``; the v1 trainer's metrics are in
``tests/test_verl_metrics_v1.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl")
torch = pytest.importorskip("torch")

from das.verl.hook import compose_verl_config, das_rollout_metrics  # noqa: E402
from das.verl.metrics import DAS_METRICS_KEY, install_trainer_metrics  # noqa: E402


class MockRayHandle:
    """Stands in for a Ray actor handle: ``handle.method.remote(...)`` awaits the real method."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)  # AttributeError, as Ray's handle raises

        class _Remote:
            @staticmethod
            async def remote(*args: Any, **kwargs: Any) -> Any:
                result = method(*args, **kwargs)
                return await result if asyncio.iscoroutine(result) else result

        return _Remote


def worker_stats(drafts: int, draft_tokens: int, accepted: int) -> dict[str, Any]:
    """A worker's cumulative ``das_stats`` (all counts in the ``long`` class)."""
    return {
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "drafts_by_class": {"long": drafts},
        "draft_tokens_by_class": {"long": draft_tokens},
        "accepted_by_class": {"long": accepted},
    }


class MockServerEngine:
    """Stands in for a rollout server's vLLM engine: one worker whose counters grow per step."""

    def __init__(self) -> None:
        self.steps = 0

    async def collective_rpc(self, method: str) -> list[dict[str, Any]]:
        assert method == "das_stats"
        return [worker_stats(10 * self.steps, 40 * self.steps, 25 * self.steps)]


def rollout_output(num_samples: int) -> Any:
    """What one of verl's agent-loop workers returns for a chunk (its meta_info included)."""
    from verl import DataProto

    metrics = [
        {"generate_sequences": 1.0, "tool_calls": 0.0, "compute_score": 0.0, "num_preempted": 0}
    ] * num_samples
    return DataProto.from_dict(
        tensors={"prompts": torch.ones(num_samples, 3, dtype=torch.long)},
        meta_info={"metrics": metrics},
    )


def test_recipe_selects_das_manager_that_verl_can_load_for_the_v0_trainer_only() -> None:
    from verl.experimental.agent_loop import AgentLoopManager
    from verl.utils.import_utils import load_class_from_fqn

    v1 = compose_verl_config(["trainer.use_v1=true"])
    assert v1.actor_rollout_ref.rollout.agent.agent_loop_manager_class is None  # verl's own
    config = compose_verl_config(["trainer.use_v1=false"])
    path = config.actor_rollout_ref.rollout.agent.agent_loop_manager_class
    manager_class = load_class_from_fqn(path, "AgentLoopManager")
    assert manager_class.__name__ == "DASAgentLoopManager"
    assert issubclass(manager_class, AgentLoopManager)


def test_importing_manager_makes_vllm_replicas_serve_das_stats() -> None:
    from verl.workers.rollout.replica import get_rollout_replica_class
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    import das.verl.manager  # noqa: F401  (verl imports it by path before starting replicas)
    from das.verl.server import DASvLLMHttpServer, DASvLLMReplica

    assert get_rollout_replica_class("vllm") is DASvLLMReplica
    assert issubclass(DASvLLMHttpServer, vLLMHttpServer)
    assert callable(DASvLLMHttpServer.das_stats)


def test_server_das_stats_returns_what_workers_return_and_survives_missing_rpc() -> None:
    from das.verl.server import DASvLLMHttpServer

    server = object.__new__(DASvLLMHttpServer)  # verl's constructor needs a Ray actor context
    server.engine = MockServerEngine()
    server.engine.steps = 2
    assert asyncio.run(server.das_stats()) == [worker_stats(20, 80, 50)]

    class EngineWithoutDASWorkers:
        async def collective_rpc(self, method: str) -> list[Any]:
            raise AttributeError(f"worker has no method {method!r}")

    server.engine = EngineWithoutDASWorkers()
    assert asyncio.run(server.das_stats()) == []


def test_manager_adds_step_metrics_from_every_replica_with_mock_ray_handles() -> None:
    """verl's own AgentLoopManager.generate_sequences runs; DAS's subclass adds its metrics."""
    from das.verl.manager import DASAgentLoopManager
    from das.verl.router import PromptAffineLoadBalancer
    from das.verl.server import DASvLLMHttpServer

    engines = [MockServerEngine(), MockServerEngine()]
    servers = {}
    for number, engine in enumerate(engines):
        server = object.__new__(DASvLLMHttpServer)
        server.engine = engine
        servers[f"server-{number}"] = MockRayHandle(server)

    class MockAgentLoopWorker:
        async def generate_sequences(self, chunk: Any) -> Any:
            for engine in engines:  # each replica serves a step of rollouts
                engine.steps += 1
            return rollout_output(len(chunk))

    manager = object.__new__(DASAgentLoopManager)  # verl's create() starts Ray actors
    manager.llm_client = type("Client", (), {})()
    manager.llm_client._load_balancer = MockRayHandle(PromptAffineLoadBalancer(servers))
    manager.agent_loop_workers = [MockRayHandle(MockAgentLoopWorker())]
    from verl import DataProto

    prompts = DataProto.from_dict(tensors={"input_ids": torch.ones(4, 3, dtype=torch.long)})
    output = manager.generate_sequences(prompts)
    metrics = output.meta_info[DAS_METRICS_KEY]
    assert "timing" in output.meta_info  # verl's own step timing is still there
    assert metrics["rollout/das_draft_tokens"] == 80.0  # 40 per replica
    assert metrics["rollout/das_accepted_tokens"] == 50.0
    assert metrics["rollout/das_accept_len"] == pytest.approx(1 + 50 / 20)
    assert metrics["rollout/das_accept_len/long"] == pytest.approx(1 + 50 / 20)


def test_manager_without_das_router_generates_without_das_metrics() -> None:
    from verl.workers.rollout.router import GlobalRequestLoadBalancer

    from das.verl.manager import gather_das_stats

    handle = MockRayHandle(GlobalRequestLoadBalancer({}))
    assert asyncio.run(gather_das_stats(handle)) is None
    assert asyncio.run(gather_das_stats(None)) is None


def training_batch(meta_info: dict[str, Any]) -> Any:
    """A GRPO training batch as verl's trainer holds it when it computes metrics."""
    from verl import DataProto

    rows, prompt, response = 4, 3, 5
    mask = torch.ones(rows, prompt + response, dtype=torch.long)
    mask[0, -2:] = 0
    scores = torch.zeros(rows, response)
    scores[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.5])
    return DataProto.from_dict(
        tensors={
            "prompts": torch.ones(rows, prompt, dtype=torch.long),
            "responses": torch.ones(rows, response, dtype=torch.long),
            "attention_mask": mask,
            "response_mask": mask[:, prompt:],
            "token_level_scores": scores,
            "token_level_rewards": scores,
            "advantages": scores - scores.mean(),
            "returns": scores.clone(),
        },
        non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)},
        meta_info=meta_info,
    )


def test_trainer_metrics_carry_das_metrics_of_the_batch() -> None:
    from verl.trainer.ppo import ray_trainer

    install_trainer_metrics()
    assert not install_trainer_metrics()  # once per process
    step = das_rollout_metrics([worker_stats(0, 0, 0)], [worker_stats(10, 40, 25)])
    rollout = training_batch({DAS_METRICS_KEY: step})
    # verl's trainer: batch = batch.union(gen_batch_output), then compute_data_metrics(batch)
    batch = training_batch({"temperature": 1.0}).union(rollout)
    metrics = ray_trainer.compute_data_metrics(batch=batch, use_critic=False)
    assert metrics["rollout/das_accept_len"] == pytest.approx(3.5)
    assert metrics["rollout/das_draft_tokens"] == 40.0
    assert "response_length/mean" in metrics  # verl's own metrics are unchanged
    plain = ray_trainer.compute_data_metrics(batch=training_batch({}), use_critic=False)
    assert not any(key.startswith("rollout/das") for key in plain)
    assert plain["response_length/mean"] == metrics["response_length/mean"]
