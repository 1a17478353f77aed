"""DAS in verl 0.9.1: compose DAS's config, see the vLLM engine arguments verl derives from it,
and turn DAS's counters into verl rollout metrics.

Users need none of this to train: DAS is switched on by configuration alone (see README, "verl").
These functions are what the tests and a curious user use to check that the switch took::

    config = compose_verl_config(["actor_rollout_ref.model.path=/models/qwen"])  # das_grpo recipe
    engine_args = verl_vllm_engine_args(config)  # verl's own argument builder, no Ray, no GPU
    assert engine_args.speculative_config["method"] == "custom_class"
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from das.verl.resolvers import CONFIG_DIR, register_resolvers

if TYPE_CHECKING:
    from omegaconf import DictConfig

SUPPORTED_VERL = "0.9.1"
RECIPE = "das_grpo"
LENGTH_CLASSES = ("long", "medium", "short")


def check_verl_version() -> str:
    """The installed verl version; ``RuntimeError`` unless it is the one DAS was written for."""
    try:
        installed = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError("verl is not installed (DAS's verl hook needs verl 0.9.1)") from error
    if installed != SUPPORTED_VERL:
        raise RuntimeError(f"DAS's verl hook supports verl {SUPPORTED_VERL}, found {installed}")
    return installed


def das_configured(config: Mapping[str, Any] | None) -> bool:
    """Whether a verl config has DAS's ``das`` group (``+das=default`` or DAS's recipe)."""
    return config is not None and config.get("das") is not None


def verl_config_dir() -> Path:
    """verl's own config folder (holding ``ppo_trainer.yaml``)."""
    import verl

    return Path(verl.__file__).resolve().parent / "trainer" / "config"


def compose_verl_config(
    overrides: Sequence[str] = (),
    config_name: str = RECIPE,
    config_dir: str | Path | None = None,
) -> DictConfig:
    """Compose a verl config with hydra, as ``verl.trainer.main_ppo`` would.

    Defaults to DAS's recipe (``das/verl/config/das_grpo.yaml``). For verl's plain trainer pass
    ``config_name="ppo_trainer"`` (``config_dir`` then defaults to verl's folder, with DAS's
    configs on the search path, so ``"+das=default"`` in ``overrides`` turns DAS on).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_verl_version()
    register_resolvers()
    if config_dir is None:
        config_dir = CONFIG_DIR if config_name == RECIPE else verl_config_dir()
    overrides = list(overrides)
    if Path(config_dir).resolve() != CONFIG_DIR:
        overrides.insert(0, "hydra.searchpath=[pkg://das.verl.config]")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def verl_vllm_engine_args(config: DictConfig) -> Any:
    """The ``AsyncEngineArgs`` that verl's vLLM rollout server would start its engine with.

    Runs verl's own builder, ``vLLMHttpServer.launch_server``, up to the point where it would
    start the server, without Ray (its constructor, which needs a Ray actor context, is skipped
    and the few attributes ``launch_server`` reads are set as for replica 0 on one node).
    """
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer
    from vllm.engine.arg_utils import AsyncEngineArgs

    check_verl_version()

    class _ArgumentCapture(vLLMHttpServer):
        async def run_server(self, args: Any) -> None:  # where verl would start the server
            self.captured_args = args

    class _NoProfiler:
        def check_enable(self) -> bool:
            return False

    server = object.__new__(_ArgumentCapture)
    server.config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    server.model_config = omega_conf_to_dataclass(
        config.actor_rollout_ref.model, dataclass_type=HFModelConfig
    )
    server._validate_configs()
    server.node_rank, server.replica_rank, server.nnodes = 0, 0, 1
    server.gpus_per_node, server.workers = 1, [None]
    server._disaggregation_role = "null"
    server._master_address, server._master_port, server._dp_rpc_port = "127.0.0.1", None, None
    server.profiler_controller = _NoProfiler()
    asyncio.run(server.launch_server())
    return AsyncEngineArgs.from_cli_args(server.captured_args)


def engine_kwargs_from_args(engine_args: Any) -> dict[str, Any]:
    """The arguments of ``engine_args`` that differ from vLLM's defaults, for ``vllm.LLM(**)``.

    ``vllm.LLM(**kwargs)`` rebuilds an ``EngineArgs`` equal to ``engine_args`` from these.
    """
    from vllm.engine.arg_utils import EngineArgs

    defaults = EngineArgs(model=engine_args.model)
    return {
        field.name: getattr(engine_args, field.name)
        for field in dataclasses.fields(EngineArgs)
        if field.init and getattr(engine_args, field.name) != getattr(defaults, field.name)
    } | {"model": engine_args.model}


async def das_stats_by_server(servers: Mapping[str, Any]) -> dict[str, list[dict[str, Any] | None]]:
    """Each rollout server's per-worker DAS counters (its ``das_stats``), by server id.

    ``servers`` maps server ids to the Ray handles of verl rollout servers that serve
    :meth:`das.verl.server.DASvLLMHttpServer.das_stats`; the servers are read concurrently.
    """
    ids = list(servers)
    per_server = await asyncio.gather(*(servers[i].das_stats.remote() for i in ids))
    return {server_id: list(stats) for server_id, stats in zip(ids, per_server, strict=True)}


def _delta(after: Mapping[str, Any], before: Mapping[str, Any] | None, key: str) -> int:
    return int(after.get(key, 0)) - int((before or {}).get(key, 0))


def das_rollout_metrics(
    before: Sequence[Mapping[str, Any] | None], after: Sequence[Mapping[str, Any] | None]
) -> dict[str, float]:
    """verl ``rollout/das_*`` metrics for one step, from DAS's per-worker stats around it.

    ``before``/``after`` are ``collective_rpc("das_stats")`` results (one dict per worker, None
    for a worker without DAS), taken before and after the step's rollouts. Accept length follows
    vLLM: 1 + accepted tokens per draft (a request-iteration that received draft tokens).
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} workers before the step but {len(after)} after")
    totals: dict[str, int] = {}
    for old, new in zip(before, after, strict=True):
        if new is None:
            continue
        for length_class in LENGTH_CLASSES:
            for kind in ("drafts", "draft_tokens", "accepted"):
                key = f"{kind}_by_class"
                name = f"{kind}/{length_class}"
                old_value = ((old or {}).get(key) or {}).get(length_class, 0)
                totals[name] = totals.get(name, 0) + int((new.get(key) or {}).get(length_class, 0))
                totals[name] -= int(old_value)
        for key in (
            "num_draft_tokens",
            "num_accepted_tokens",
            "num_skipped_batches",
            "num_gated_batches",
        ):
            totals[key] = totals.get(key, 0) + _delta(new, old, key)
    drafts = sum(totals.get(f"drafts/{c}", 0) for c in LENGTH_CLASSES)
    metrics = {
        "rollout/das_draft_tokens": float(totals.get("num_draft_tokens", 0)),
        "rollout/das_accepted_tokens": float(totals.get("num_accepted_tokens", 0)),
        "rollout/das_accept_len": 1.0 + totals.get("num_accepted_tokens", 0) / drafts
        if drafts
        else 1.0,
        # Batches not looked up: no draft could pay, or recent lookups at their size saved
        # less than they took (das.lookup_gate).
        "rollout/das_skipped_batches": float(totals.get("num_skipped_batches", 0)),
        "rollout/das_gated_batches": float(totals.get("num_gated_batches", 0)),
    }
    for length_class in LENGTH_CLASSES:
        class_drafts = totals.get(f"drafts/{length_class}", 0)
        accepted = totals.get(f"accepted/{length_class}", 0)
        metrics[f"rollout/das_draft_tokens/{length_class}"] = float(
            totals.get(f"draft_tokens/{length_class}", 0)
        )
        metrics[f"rollout/das_accepted_tokens/{length_class}"] = float(accepted)
        metrics[f"rollout/das_accept_len/{length_class}"] = (
            1.0 + accepted / class_drafts if class_drafts else 1.0
        )
    return metrics


def das_rollout_metrics_by_server(
    before: Mapping[str, Sequence[Mapping[str, Any] | None]],
    after: Mapping[str, Sequence[Mapping[str, Any] | None]],
) -> dict[str, float]:
    """:func:`das_rollout_metrics` over the servers in ``after``, from counters keyed by server.

    A server missing from ``before`` (or whose worker count changed) counts from zero, as its
    engine did when it started.
    """
    old: list[Mapping[str, Any] | None] = []
    new: list[Mapping[str, Any] | None] = []
    for server_id, workers in after.items():
        previous = list(before.get(server_id) or ())
        old += previous if len(previous) == len(workers) else [None] * len(workers)
        new += workers
    return das_rollout_metrics(old, new)
