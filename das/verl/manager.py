"""verl's agent-loop manager, plus DAS's rollout metrics for every step it generates.

For verl's v0 trainer (``trainer.use_v1=false``): selected by
``actor_rollout_ref.rollout.agent.agent_loop_manager_class`` (DAS's verl config sets it for v0
only; the v1 trainer's metrics come from :class:`das.verl.metrics.DASTrainerMetrics`). Importing
this module, which verl's trainer does before it starts rollout replicas, makes them serve
through :class:`das.verl.server.DASvLLMHttpServer` and has verl's trainer log the metrics
(:mod:`das.verl.metrics`).

Each :meth:`DASAgentLoopManager.generate_sequences` reads DAS's counters from every rollout
server before and after verl's own rollout and stores the difference, as verl metrics
(:func:`das.verl.hook.das_rollout_metrics`: ``rollout/das_accept_len``, ``das_draft_tokens``,
``das_accepted_tokens``, each also per length class), in the output's ``meta_info``. The servers
are found through DAS's router (:meth:`das.verl.router.PromptAffineLoadBalancer.servers`); with
another router, rollouts run as before and no DAS metrics are logged (a warning says so once).
"""

from __future__ import annotations

import logging
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopManager
from verl.utils.ray_utils import auto_await

from das.verl.hook import das_rollout_metrics, das_stats_by_server
from das.verl.metrics import DAS_METRICS_KEY, install_trainer_metrics
from das.verl.server import register_replica

logger = logging.getLogger(__name__)


async def gather_das_stats(load_balancer: Any) -> list[dict[str, Any] | None] | None:
    """Every rollout worker's DAS counters, server by server (None: no DAS router)."""
    servers = getattr(load_balancer, "servers", None)
    if servers is None:
        return None
    per_server = await das_stats_by_server(await servers.remote())
    return [stats for server_stats in per_server.values() for stats in server_stats]


class DASAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager`` that adds DAS's metrics to each rollout's ``meta_info``."""

    _warned_no_router = False

    @auto_await
    async def generate_sequences(self, prompts: Any) -> Any:
        before = await self._das_stats()
        output = await super().generate_sequences(prompts)
        after = await self._das_stats()
        if before is not None and after is not None and len(before) == len(after):
            output.meta_info[DAS_METRICS_KEY] = das_rollout_metrics(before, after)
        return output

    async def _das_stats(self) -> list[dict[str, Any] | None] | None:
        load_balancer = getattr(self.llm_client, "_load_balancer", None)
        stats = await gather_das_stats(load_balancer)
        if stats is None and not DASAgentLoopManager._warned_no_router:
            DASAgentLoopManager._warned_no_router = True
            logger.warning(
                "DAS metrics need DAS's router (actor_rollout_ref.rollout.router_config_path); "
                "rollouts run, but rollout/das_* metrics are not logged"
            )
        return stats


register_replica()
install_trainer_metrics()
