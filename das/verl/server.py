"""verl's vLLM rollout server and replica, plus DAS's stats RPC that returns its results.

verl 0.9.1's ``vLLMHttpServer.collective_rpc`` awaits the engine's RPC and drops what the workers
return, so DAS's per-worker counters (``das_stats``, added to the workers by
:class:`das.verl.worker.DASColocateWorkerExtension`) cannot be read through it.
:class:`DASvLLMHttpServer` adds :meth:`~DASvLLMHttpServer.das_stats`, which returns them;
everything else is verl's server unchanged. :func:`register_replica` makes verl build rollout
replicas of backend ``"vllm"`` with this server (``RolloutReplicaRegistry``, verl's own seam).
It is called before verl starts replicas: with verl's v0 trainer when DAS's agent-loop manager
module is imported (verl imports it by the class path in
``actor_rollout_ref.rollout.agent.agent_loop_manager_class``), with the v1 trainer by the
constructor of DAS's trainer subclass (:class:`das.verl.metrics.DASTrainerMetrics`).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

logger = logging.getLogger(__name__)

BACKEND = "vllm"


class DASvLLMHttpServer(vLLMHttpServer):
    """verl's vLLM rollout server with :meth:`das_stats`."""

    STATS_RPC = "das_stats"  # the worker method (DAS's worker extension) that holds the counters

    async def das_stats(self) -> list[dict[str, Any] | None]:
        """DAS's counters from each worker of this server's engine (None: DAS is off there).

        Metrics must never stop training: an engine whose workers lack the RPC (DAS's worker
        extension was replaced) or whose call fails gives an empty list and a warning. A real
        ``AsyncLLM`` reports a failed worker call as a plain ``Exception`` from its utility
        path, not as the worker's ``AttributeError``, so every ``Exception`` is caught here.
        """
        try:
            return list(await self.engine.collective_rpc(self.STATS_RPC))
        except Exception as error:
            logger.warning("DAS stats unavailable on this rollout server: %r", error)
            return []


class DASvLLMReplica(vLLMReplica):
    """verl's vLLM replica, serving through :class:`DASvLLMHttpServer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(DASvLLMHttpServer)


def _load_replica() -> type[vLLMReplica]:
    return DASvLLMReplica


def register_replica() -> None:
    """Make verl's ``"vllm"`` rollout backend use :class:`DASvLLMReplica` (idempotent)."""
    if RolloutReplicaRegistry._registry.get(BACKEND) is _load_replica:
        return
    RolloutReplicaRegistry.register(BACKEND, _load_replica)
    logger.info("verl rollout backend %r serves through DASvLLMHttpServer", BACKEND)
