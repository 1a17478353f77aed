"""DAS's rollout metrics reach the logged metrics of verl 0.9.1's v1 trainer (its default).

The trainers are verl's real v1 classes, built by their real constructors from composed configs
(``trainer.init()`` and ``fit()`` start Ray workers on GPUs and cannot run here). The Ray handles
of the rollout servers are mocks (``MockRayHandle`` around DAS's real server class, over a mock
engine), and so are verl's LLM-server and checkpoint managers around them; each test calls the
trainer hooks in the order verl's ``PPOTrainer.fit`` does::

    on_step_begin(); step()  # rollouts, on_sample_end, training
    on_step_end(); metrics.update(_consume_sync_metrics())
    on_validate_begin(); _validate(); on_validate_end()  # every test_freq steps
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest

pytest.importorskip("verl")
# verl's v1 trainer imports TransferQueue; scripts/setup_env.sh installs it, so a missing one is
# a failure here, not a skip.
import transfer_queue  # noqa: F401

from das.verl.hook import compose_verl_config, das_rollout_metrics
from das.verl.metrics import DASTrainerMetrics, install_v1_trainer_metrics
from tests.test_verl_metrics import MockRayHandle, MockServerEngine, worker_stats

MODES = ("sync", "colocate_async", "separate_async")
SEPARATE_ASYNC = [  # what verl's separate_async constructor checks
    "actor_rollout_ref.rollout.nnodes=1",
    "actor_rollout_ref.rollout.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl",
    "data.train_batch_size=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
]


def das_server(engine: Any) -> Any:
    """DAS's rollout server over ``engine`` (verl's constructor needs a Ray actor context)."""
    from das.verl.server import DASvLLMHttpServer

    server = object.__new__(DASvLLMHttpServer)
    server.engine = engine
    return server


class MockLLMServerManager:
    """Stands in for verl's ``LLMServerManager``: its replicas' server addresses and handles."""

    def __init__(self, engines: dict[str, MockServerEngine]) -> None:
        self.server_addresses = list(engines)
        self.server_handles = [MockRayHandle(das_server(engine)) for engine in engines.values()]


class MockCheckpointManager:
    """Stands in for verl's ``CheckpointEngineManager``: records weight updates, and resumes
    generation on ``engines`` (one more step of counters each) when verl resumes it."""

    def __init__(self, engines: list[MockServerEngine], sync_metrics: dict | None = None) -> None:
        self.engines = engines
        self.sync_metrics = sync_metrics
        self.updates: list[int] = []

    def update_weights(self, global_steps: int) -> dict | None:
        self.updates.append(global_steps)
        return self.sync_metrics

    def resume_generation_replicas(self) -> None:
        for engine in self.engines:
            engine.steps += 1


def generate(engines: list[MockServerEngine], steps: list[int]) -> None:
    """The replicas serve rollouts: each engine's counters grow by its number of steps."""
    for engine, count in zip(engines, steps, strict=True):
        engine.steps += count


def expected(steps: int) -> dict[str, float]:
    """The metrics of ``steps`` engine steps of :class:`MockServerEngine` counters, in all."""
    return das_rollout_metrics([None], [worker_stats(10 * steps, 40 * steps, 25 * steps)])


def v1_trainer(mode: str, overrides: list[str] = (), config_name: str = "das_grpo") -> Any:
    """verl's registered v1 trainer for ``mode``, built by its own constructor (no Ray)."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    base = ["actor_rollout_ref.model.path=/models/any", f"trainer.v1.trainer_mode={mode}"]
    if config_name != "das_grpo":
        base.append("actor_rollout_ref.rollout.name=vllm")
    config = compose_verl_config([*base, *overrides], config_name=config_name)
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config)
    trainer.timing_raw, trainer.global_steps, trainer.prev_step_profile = {}, 1, False
    if mode == "separate_async":  # set by init(); hybrid replicas lent to rollout or not
        from verl.trainer.ppo.v1.trainer_separate_async import HybridEngineMode

        trainer.current_mode = HybridEngineMode.TRAINER
    return trainer


def end_step(trainer: Any) -> dict[str, Any]:
    """What verl's fit() does at a step's end: on_step_end, then the pending metrics."""
    trainer.on_step_end()
    metrics = trainer._consume_sync_metrics()
    trainer.global_steps += 1
    return metrics


def das_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key.startswith("rollout/das")}


def test_plugin_registers_das_trainer_for_every_v1_mode_when_verl_imports_them() -> None:
    import verl.trainer.ppo.v1 as v1
    from verl.trainer.ppo.v1 import get_trainer_cls, trainer_base

    from das.verl.plugin import _InstallAfterExec

    # Installed by DAS's verl plugin as verl imported the package (not by this test).
    assert isinstance(sys.modules["verl.trainer.ppo.v1"].__spec__.loader, _InstallAfterExec)
    verls = {
        "sync": v1.PPOTrainerSync,
        "colocate_async": v1.PPOTrainerColocateAsync,
        "separate_async": v1.PPOTrainerSeparateAsync,
    }
    assert set(trainer_base.TRAINER_REGISTRY) == set(MODES)
    for mode in MODES:
        trainer_cls = get_trainer_cls(mode)  # what verl's TaskRunnerV1 calls
        assert trainer_cls is trainer_base.get_trainer_cls(mode)
        assert trainer_cls.__mro__[1:3] == (DASTrainerMetrics, verls[mode])
        assert not trainer_cls.__abstractmethods__
    registry = dict(trainer_base.TRAINER_REGISTRY)
    assert install_v1_trainer_metrics() == []  # idempotent
    assert registry == trainer_base.TRAINER_REGISTRY


def test_sync_step_logs_summed_per_server_differences_with_mock_ray_handles() -> None:
    from verl.workers.rollout.replica import get_rollout_replica_class

    from das.verl.server import DASvLLMReplica

    trainer = v1_trainer("sync")
    assert get_rollout_replica_class("vllm") is DASvLLMReplica  # the constructor registered it
    engines = [MockServerEngine(), MockServerEngine()]
    trainer.llm_server_manager = MockLLMServerManager({"10.0.0.1:1": engines[0], "b:2": engines[1]})
    trainer.checkpoint_manager = MockCheckpointManager(engines)

    trainer.on_step_begin()
    generate(engines, [1, 2])  # step 1's rollouts: 40 + 80 draft tokens
    trainer._pending_sync_metrics = {"weight_sync/changed_ratio": 0.5}  # verl's own
    metrics = end_step(trainer)
    assert das_metrics(metrics) == expected(3)
    assert metrics["rollout/das_draft_tokens"] == 120.0
    assert metrics["rollout/das_accept_len"] == pytest.approx(1 + 75 / 30)
    assert metrics["weight_sync/changed_ratio"] == 0.5  # verl's pending metrics survive
    assert trainer.checkpoint_manager.updates == [1]  # verl's own on_step_end ran

    trainer.on_validate_begin()
    generate(engines, [5, 5])  # validation rollouts: not a training step's
    trainer.on_validate_end()
    trainer.on_step_begin()
    generate(engines, [0, 1])
    metrics = end_step(trainer)
    assert das_metrics(metrics) == expected(1)
    assert trainer.checkpoint_manager.updates == [1, 2]
    assert end_step(trainer)["rollout/das_draft_tokens"] == 0.0  # a step without rollouts
    assert trainer._consume_sync_metrics() == {}  # consumed: nothing left for the next step


def test_colocate_async_counts_resumed_generation_in_next_step_with_mock_ray_handles() -> None:
    trainer = v1_trainer("colocate_async")
    engines = [MockServerEngine()]
    trainer.llm_server_manager = MockLLMServerManager({"replica-0": engines[0]})
    trainer.checkpoint_manager = MockCheckpointManager(engines)  # resume: +1 step of rollouts

    trainer.on_step_begin()
    generate(engines, [2])  # generation until on_sample_end aborts it
    assert das_metrics(end_step(trainer)) == expected(2)  # read before verl resumed generation
    assert engines[0].steps == 3
    trainer.on_step_begin()
    generate(engines, [1])
    assert das_metrics(end_step(trainer)) == expected(2)  # the resumed step and this one


def test_separate_async_keeps_verls_metrics_counts_all_replicas_with_mock_ray_handles() -> None:
    trainer = v1_trainer("separate_async", SEPARATE_ASYNC)
    hybrid, standalone = [MockServerEngine()], [MockServerEngine(), MockServerEngine()]
    trainer.llm_server_manager = MockLLMServerManager({"hybrid-0": hybrid[0]})
    trainer.standalone_server_manager = MockLLMServerManager(
        {"standalone-0": standalone[0], "standalone-1": standalone[1]}
    )
    # verl's separate_async on_step_end replaces _pending_sync_metrics with its weight sync's.
    trainer.standalone_checkpoint_manager = MockCheckpointManager([], {"weight_sync/bytes": 7.0})

    trainer.on_step_begin()
    generate([*hybrid, *standalone], [1, 2, 3])
    metrics = end_step(trainer)
    assert metrics["weight_sync/bytes"] == 7.0
    assert das_metrics(metrics) == expected(6)
    generate(standalone, [1, 0])  # standalone replicas run on between steps
    trainer.on_step_begin()
    generate(standalone, [0, 1])
    assert das_metrics(end_step(trainer)) == expected(2)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_without_das_config_adds_nothing_with_mock_ray_handles(mode: str) -> None:
    class UntouchableHandle:  # a read of any server would fail the test
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"DAS read rollout server attribute {name!r} without DAS")

    overrides = SEPARATE_ASYNC if mode == "separate_async" else []
    trainer = v1_trainer(mode, overrides, config_name="ppo_trainer")
    assert "das" not in trainer.config
    manager = MockLLMServerManager({})
    manager.server_addresses, manager.server_handles = ["s"], [UntouchableHandle()]
    trainer.llm_server_manager = trainer.standalone_server_manager = manager
    trainer.checkpoint_manager = MockCheckpointManager([])
    trainer.standalone_checkpoint_manager = MockCheckpointManager([], {"weight_sync/bytes": 1.0})

    trainer.on_step_begin()
    metrics = end_step(trainer)
    trainer.on_validate_end()
    assert not das_metrics(metrics)
    assert metrics == ({"weight_sync/bytes": 1.0} if mode == "separate_async" else {})
    updated = trainer.standalone_checkpoint_manager if mode == "separate_async" else None
    assert (updated or trainer.checkpoint_manager).updates == [1]


def test_unreadable_das_stats_warn_and_training_goes_on_with_mock_ray_handles(
    caplog, monkeypatch
) -> None:
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    monkeypatch.setattr(DASTrainerMetrics, "_das_warned", False)
    trainer = v1_trainer("sync")
    manager = MockLLMServerManager({})
    plain = object.__new__(vLLMHttpServer)  # verl's server: no das_stats
    manager.server_addresses, manager.server_handles = ["s"], [MockRayHandle(plain)]
    trainer.llm_server_manager = manager
    trainer.checkpoint_manager = MockCheckpointManager([])

    with caplog.at_level(logging.WARNING, logger="das.verl.metrics"):
        metrics = end_step(trainer)
    assert metrics == {}
    assert trainer.checkpoint_manager.updates == [1]
    assert "rollout/das_* metrics not logged" in caplog.text
