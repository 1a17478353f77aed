"""Prompt-affine routing for verl's rollout replicas: a prompt's samples go where its history is.

DAS keeps each prompt's recent rollouts in the vLLM worker that generated them. verl's default
router sends each request to the least-busy replica, so with R replicas a prompt's next samples
would mostly land where its history is not. :class:`PromptAffineLoadBalancer` remembers, per
prompt key, the replica it chose the first time (the least busy one then) and sends every later
request of that prompt there, in this step and every later step.

Trade-off, against broadcasting history to every replica after each step: routing moves no data
and keeps each replica's trees 1/R the size, but balances load per prompt rather than per
request (a step's n samples of one prompt share a replica; with many prompts per step the load
evens out), and the assignment lives in the router actor: if it restarts, prompts are
re-assigned once and their history rebuilds in one step. Broadcasting would balance per request
but ship every rollout to every replica each step and multiply tree memory by R.

The key is the request's ``extra_args["das_prompt_key"]`` (set by DAS's agent loop), else the
same hash of the prompt tokens that DAS's proposer uses, so the two always agree.
Configured by ``actor_rollout_ref.rollout.router_config_path`` (``das/verl/config/router.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from verl.workers.rollout.router import GlobalRequestLoadBalancer

from das.verl.agent_loop import PROMPT_KEY_ARG
from rollouts.trace import prompt_key_for


def request_prompt_key(
    prompt_ids: Sequence[int] | None, sampling_params: Mapping[str, Any] | None
) -> str | None:
    """The DAS prompt key of a request, as the proposer will compute it (None: unknown)."""
    extra_args = (sampling_params or {}).get("extra_args") or {}
    key = extra_args.get(PROMPT_KEY_ARG)
    if key is not None:
        return str(key)
    return prompt_key_for(prompt_ids) if prompt_ids is not None and len(prompt_ids) else None


class PromptAffineLoadBalancer(GlobalRequestLoadBalancer):
    """verl load balancer: least-busy replica for a prompt's first request, the same one after.

    verl builds it as ``cls(servers, router_yaml_dict)`` and wraps it in a Ray actor.
    """

    def __init__(self, servers: dict[str, Any], config: Mapping[str, Any] | None = None) -> None:
        super().__init__(servers)
        self._server_of_prompt: dict[str, str] = {}

    def require_acquire_fields(self) -> list[str]:
        return ["prompt_ids", "sampling_params"]

    def acquire_server(
        self,
        request_id: str,
        prompt_ids: Sequence[int] | None = None,
        sampling_params: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> tuple[str, Any]:
        key = request_prompt_key(prompt_ids, sampling_params)
        if key is None:
            return super().acquire_server(request_id)
        server_id = self._server_of_prompt.get(key)
        if server_id not in self._inflight_requests:  # first request, or its replica was removed
            if not self._inflight_requests:
                raise RuntimeError("No available servers in load balancer")
            server_id = min(self._inflight_requests, key=self._inflight_requests.__getitem__)
            self._server_of_prompt[key] = server_id
        self._inflight_requests[server_id] += 1
        return server_id, self._servers[server_id]

    def servers(self) -> dict[str, Any]:
        """Server id -> rollout server handle, for reading DAS's stats from every replica."""
        return dict(self._servers)

    def prompt_assignment(self) -> dict[str, str]:
        """Prompt key -> server id, for inspection."""
        return dict(self._server_of_prompt)
