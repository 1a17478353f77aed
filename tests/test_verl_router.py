"""The prompt-affine router (das.verl.router) under concurrent callers, a replica leaving the
pool, and its bounded prompt map.

Ray cannot run here, so the replicas are stand-ins: each holds a real
:class:`das.drafter.DASDrafter` that records every request routed to it (start, draft, extend,
finish, as an engine's proposer does), and the router is called in-process, as verl's Ray actor
would call it.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("verl")

from das.config import DASConfig
from das.drafter import DASDrafter
from das.verl.agent_loop import PROMPT_KEY_ARG
from das.verl.router import DEFAULT_MAX_PROMPTS, PromptAffineLoadBalancer

ROOT = Path(__file__).resolve().parents[1]
NUM_THREADS = 8
NUM_REPLICAS = 4


class StandInReplica:
    """A rollout replica: its drafter records each request's rollout. ``close`` makes any later
    request fail, as a replica that left would."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.drafter = DASDrafter(DASConfig(num_speculative_tokens=4))
        self.drafter.begin_step(1)
        self._lock = threading.Lock()  # one engine step at a time, as in a vLLM worker
        self.closed = False

    def generate(self, request_id: str, prompt: np.ndarray, key: str, response: np.ndarray):
        """Decode ``response`` in two engine steps (other requests interleave) and return it."""
        half = len(response) // 2
        with self._lock:
            if self.closed:
                raise RuntimeError(f"replica {self.name} is gone (request {request_id})")
            self.drafter.start_request(request_id, prompt, prompt_key=key)
            self.drafter.propose([request_id])
            self.drafter.extend_many([request_id], [response[:half]])
        with self._lock:
            self.drafter.propose([request_id])
            self.drafter.extend_many([request_id], [response[half:]])
            self.drafter.finish_request(request_id, "stop")
        return response

    def rollouts(self) -> dict[str, list[tuple[int, ...]]]:
        """Prompt key -> the responses its history holds on this replica."""
        history, forest = self.drafter.history, self.drafter.forest
        return {
            key: [tuple(forest.sequence_tokens(i).tolist()) for i in history.rollout_ids(key)]
            for key in history.prompt_keys()
        }


def _workload(num_prompts: int, samples: int, seed: int):
    """(request id, prompt key, prompt tokens, response) per sample, shuffled."""
    rng = np.random.default_rng(seed)
    requests = []
    for prompt in range(num_prompts):
        tokens = rng.integers(0, 1000, 6)
        for sample in range(samples):
            response = rng.integers(0, 1000, int(rng.integers(8, 40)))
            requests.append((f"{seed}-{prompt}-{sample}", f"p{prompt}", tokens, response))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def _serve(router, requests, burst: bool) -> dict[str, str]:
    """Run ``requests`` on NUM_THREADS threads; request id -> the server it was routed to.
    Fails if any output is lost or wrong.

    ``burst``: the threads first acquire every request (a step's requests are all in flight
    together, as verl submits them), then generate and release them. Otherwise each thread
    acquires, generates and releases one request after another, so acquires and releases of
    different threads interleave.
    """

    def acquire(request):
        request_id, key, prompt, _ = request
        params = {"extra_args": {PROMPT_KEY_ARG: key}}
        return router.acquire_server(request_id, prompt_ids=prompt, sampling_params=params)

    def finish(request, server_id, handle):
        request_id, key, prompt, response = request
        try:
            output = handle.generate(request_id, prompt, key, response)
        finally:
            router.release_server(server_id, request_id)
        assert np.array_equal(output, response)
        return request_id, server_id

    with ThreadPoolExecutor(NUM_THREADS) as pool:
        if burst:
            acquired = list(pool.map(acquire, requests))
            return dict(pool.map(finish, requests, *zip(*acquired, strict=True)))
        return dict(pool.map(lambda request: finish(request, *acquire(request)), requests))


def _router(max_prompts: int | None = None):
    replicas = {f"replica-{i}": StandInReplica(f"replica-{i}") for i in range(NUM_REPLICAS)}
    config = {"router_class": "das.verl.router.PromptAffineLoadBalancer"}
    if max_prompts is not None:
        config["max_prompts"] = max_prompts
    return PromptAffineLoadBalancer(replicas, config), replicas


def _server_of_prompt(requests, routed: dict[str, str]) -> dict[str, str]:
    """Prompt key -> its one server (fails if a prompt's samples went to two)."""
    servers = defaultdict(set)
    for request_id, key, _, _ in requests:
        servers[key].add(routed[request_id])
    assert all(len(s) == 1 for s in servers.values()), {
        k: s for k, s in servers.items() if len(s) > 1
    }
    return {key: s.pop() for key, s in servers.items()}


def test_concurrent_callers_keep_each_prompt_on_one_replica_with_stand_in_replicas() -> None:
    """8 threads, 4 replicas, 200 prompts x 4 samples, in two steps: the first a burst (all of
    it in flight), the second free-running. Each prompt's rollouts all land in one replica's
    drafter, the in-flight counts return to 0, and no replica holds more than 1.3 times its even
    share of the prompts (in a burst the in-flight counts spread new prompts)."""
    load_factor = 1.3
    router, replicas = _router()
    first = _workload(num_prompts=200, samples=4, seed=1)
    again = [(f"again-{rid}", key, prompt, response) for rid, key, prompt, response in first]
    routed = _serve(router, first, burst=True)
    assert router.get_total_inflight() == 0
    routed.update(_serve(router, again, burst=False))
    requests = first + again
    assert len(routed) == len(requests)
    server_of = _server_of_prompt(requests, routed)
    assert router.get_status()["servers"] == dict.fromkeys(replicas, 0)
    # The drafters' histories: every prompt on exactly its router replica, with all its samples.
    expected = defaultdict(list)
    for _, key, _, response in requests:
        expected[key].append(tuple(response.tolist()))
    for name, replica in replicas.items():
        replica.drafter.check_integrity()
        held = replica.rollouts()
        assert set(held) == {key for key, server in server_of.items() if server == name}
        for key, responses in held.items():
            assert sorted(responses) == sorted(expected[key])
    prompts_per_replica = Counter(server_of.values())
    assert set(prompts_per_replica) == set(replicas)
    even_share = len(server_of) / NUM_REPLICAS
    assert max(prompts_per_replica.values()) <= load_factor * even_share, prompts_per_replica
    assert router.prompt_assignment() == server_of


def test_idle_replicas_share_new_prompts_evenly_with_stand_in_replicas() -> None:
    """Requests one at a time (every replica idle at each acquire): new prompts still spread,
    two per replica for eight prompts, instead of all going to the first replica."""
    router, _ = _router()
    for prompt in range(8):
        params = {"extra_args": {PROMPT_KEY_ARG: f"p{prompt}"}}
        server_id, _ = router.acquire_server(f"r{prompt}", prompt_ids=[1], sampling_params=params)
        router.release_server(server_id)
    assert sorted(Counter(router.prompt_assignment().values()).values()) == [2, 2, 2, 2]


def test_a_removed_replica_hands_its_prompts_over_with_stand_in_replicas() -> None:
    """verl's ``remove_servers``: a request in flight on the replica still completes; on their
    next request its prompts go to the remaining replicas (one each) and their requests
    complete; every other prompt keeps its replica."""
    router, replicas = _router()
    first = _workload(num_prompts=120, samples=3, seed=2)
    before = _server_of_prompt(first, _serve(router, first, burst=True))
    gone = Counter(before.values()).most_common(1)[0][0]
    moved = {key for key, server in before.items() if server == gone}
    assert moved

    # A request of one of its prompts is in flight when the replica leaves: it completes there.
    _, key, prompt, response = next(r for r in first if r[1] in moved)
    params = {"extra_args": {PROMPT_KEY_ARG: key}}
    server_id, handle = router.acquire_server(
        "in-flight", prompt_ids=prompt, sampling_params=params
    )
    assert server_id == gone
    router.remove_servers([gone])
    assert np.array_equal(handle.generate("in-flight", prompt, key, response), response)
    router.release_server(server_id, "in-flight")  # its counter left with it: a no-op
    replicas[gone].closed = True
    assert gone not in router.get_all_servers()

    again = [(f"again-{rid}", key, prompt, response) for rid, key, prompt, response in first]
    after = _server_of_prompt(again, _serve(router, again, burst=False))
    assert all(after[key] != gone for key in moved)
    assert {key: after[key] for key in before if key not in moved} == {
        key: server for key, server in before.items() if key not in moved
    }
    assert router.get_total_inflight() == 0
    assert gone not in set(router.prompt_assignment().values())  # no entry points at it
    for key in moved:  # the moved prompts' new rollouts are in their new replica's drafter
        assert len(replicas[after[key]].rollouts()[key]) == 3


def test_prompt_map_is_a_bounded_lru_with_stand_in_replicas() -> None:
    """max_prompts=100 over 1,000 prompts: the map never holds more than 100, recently used
    prompts keep their replica throughout, and the oldest unused ones are forgotten."""
    router, _ = _router(max_prompts=100)
    hot = [f"hot-{i}" for i in range(20)]
    first_server = {}
    sizes = []

    def step(keys: list[str], tag: str) -> None:
        # A step's requests are acquired together, then released (so replicas are busy).
        acquired = []
        for key in keys:
            for sample in range(2):
                params = {"extra_args": {PROMPT_KEY_ARG: key}}
                server_id, _ = router.acquire_server(
                    f"{tag}-{key}-{sample}", prompt_ids=[1], sampling_params=params
                )
                if key in hot:
                    assert first_server.setdefault(key, server_id) == server_id, key
                acquired.append(server_id)
                sizes.append(router.num_prompts)
        for server_id in acquired:
            router.release_server(server_id)

    cold = [f"cold-{i}" for i in range(1000)]
    for index in range(0, 1000, 25):  # every step: the hot prompts and 25 new ones
        step(hot + cold[index : index + 25], f"s{index}")
    assert max(sizes) == 100
    assignment = router.prompt_assignment()
    assert len(assignment) == 100
    assert set(hot) <= set(assignment)
    assert "cold-0" not in assignment and "cold-999" in assignment
    assert len(set(first_server.values())) > 1  # the hot prompts spread: keeping them is a claim
    assert router.get_total_inflight() == 0


def test_max_prompts_comes_from_the_router_yaml_and_is_checked() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "das" / "verl" / "config" / "router.yaml").read_text())
    assert PromptAffineLoadBalancer({"a": "h"}, config).max_prompts == config["max_prompts"]
    assert PromptAffineLoadBalancer({"a": "h"}).max_prompts == DEFAULT_MAX_PROMPTS
    for bad in (0, -5, 2.5, "100", True):
        with pytest.raises(ValueError, match=f"max_prompts={bad!r} must be"):
            PromptAffineLoadBalancer({"a": "h"}, {"max_prompts": bad})
