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

The map is bounded: it keeps the ``max_prompts`` most recently routed prompts (least recently
used evicted first). An evicted prompt is assigned afresh on its next request, to the least
busy replica then; its history may stay behind on the old replica (drafts for it start over),
and outputs are not affected. A prompt whose replica left the pool (verl's ``remove_servers``)
is assigned afresh on its next request too; until then its entry stays, so a replica that verl
removes and adds back under the same id (hybrid replicas around each training phase) keeps the
prompts that did not come back meanwhile.

verl wraps the class in a synchronous Ray actor, which runs one call at a time; a lock still
guards every method that touches the counts or the map, so in-process callers on several
threads (a threaded actor, benchmarks) see the same atomic acquire.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from verl.workers.rollout.router import GlobalRequestLoadBalancer

from das.verl.agent_loop import PROMPT_KEY_ARG
from rollouts.trace import prompt_key_for

logger = logging.getLogger(__name__)

DEFAULT_MAX_PROMPTS = 65_536  # prompt -> replica entries kept (about 130 bytes each)


def max_prompts_of(config: Mapping[str, Any] | None) -> int:
    """The ``max_prompts`` key of a router config (default :data:`DEFAULT_MAX_PROMPTS`)."""
    value = (config or {}).get("max_prompts", DEFAULT_MAX_PROMPTS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_prompts={value!r} must be an integer >= 1")
    return value


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

    Least busy: fewest requests in flight, then fewest prompts assigned. verl builds it as
    ``cls(servers, router_yaml_dict)`` and wraps it in a Ray actor; the config's
    ``max_prompts`` bounds the prompt map (:func:`max_prompts_of`).
    """

    def __init__(self, servers: dict[str, Any], config: Mapping[str, Any] | None = None) -> None:
        super().__init__(servers)
        self.max_prompts = max_prompts_of(config)
        # prompt key -> server id, least recently routed first; len <= max_prompts
        self._server_of_prompt: OrderedDict[str, str] = OrderedDict()
        # server id -> its entries in _server_of_prompt (the tie-break between idle replicas)
        self._num_prompts_on: Counter[str] = Counter()
        self._lock = threading.Lock()

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
        with self._lock:
            if key is None:
                return super().acquire_server(request_id)
            server_id = self._server_of_prompt.get(key)
            if server_id in self._inflight_requests:
                self._server_of_prompt.move_to_end(key)
            else:  # first request, evicted, or its replica was removed: assign afresh
                if not self._inflight_requests:
                    raise RuntimeError("No available servers in load balancer")
                if server_id is not None:
                    logger.debug("prompt %s: replica %s is gone, reassigning", key, server_id)
                    self._forget(key)
                server_id = self._least_busy()
                self._server_of_prompt[key] = server_id
                self._num_prompts_on[server_id] += 1
                while len(self._server_of_prompt) > self.max_prompts:
                    self._forget(next(iter(self._server_of_prompt)))
            self._inflight_requests[server_id] += 1
            return server_id, self._servers[server_id]

    def _least_busy(self) -> str:
        """The server with the fewest requests in flight; among those, the fewest prompts (so
        that replicas idle between requests still share new prompts evenly)."""
        inflight, prompts = self._inflight_requests, self._num_prompts_on
        return min(inflight, key=lambda server_id: (inflight[server_id], prompts[server_id]))

    def _forget(self, key: str) -> None:
        server_id = self._server_of_prompt.pop(key)
        self._num_prompts_on[server_id] -= 1
        if not self._num_prompts_on[server_id]:
            del self._num_prompts_on[server_id]

    def release_server(self, server_id: str, request_id: str | None = None) -> None:
        with self._lock:
            super().release_server(server_id, request_id)

    def add_servers(self, servers: dict[str, Any]) -> None:
        with self._lock:
            super().add_servers(servers)

    def remove_servers(self, server_ids: list[str]) -> None:
        """verl's removal: the servers leave the pool; their prompts are assigned afresh on
        their next request (see the module docstring for why the entries stay until then)."""
        with self._lock:
            super().remove_servers(server_ids)

    def servers(self) -> dict[str, Any]:
        """Server id -> rollout server handle, for reading DAS's stats from every replica."""
        with self._lock:
            return dict(self._servers)

    def prompt_assignment(self) -> dict[str, str]:
        """Prompt key -> server id, least recently routed first, for inspection."""
        with self._lock:
            return dict(self._server_of_prompt)

    @property
    def num_prompts(self) -> int:
        """Prompts in the map (at most :attr:`max_prompts`)."""
        return len(self._server_of_prompt)
