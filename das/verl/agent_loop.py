"""verl's single-turn agent loop, plus the dataset index as each request's DAS prompt key.

verl draws a fresh ``uid`` per prompt per step and vLLM randomises request ids, so neither can
key history. The dataset row is stable across epochs: verl's ``RLHFDataset`` passes
``extra_info["index"]`` (and ``data_source``) to the agent loop, and this loop puts
``"<data_source>:<index>"`` into ``SamplingParams.extra_args["das_prompt_key"]``, which DAS's
proposer reads. A row without ``extra_info.index`` gets no key (verl would give every such row
index 0), and the proposer falls back to a hash of the prompt tokens.

Selected by ``actor_rollout_ref.rollout.agent.default_agent_loop: das_single_turn``
(``das/verl/config/das/default.yaml`` sets it, with ``agent_loops.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

PROMPT_KEY_ARG = "das_prompt_key"  # == das.vllm.proposer.PROMPT_KEY_ARG (that module needs vLLM)


def prompt_key_of(sample: Mapping[str, Any]) -> str | None:
    """``"<data_source>:<index>"`` from a verl sample's fields, or None without a dataset index."""
    extra_info = sample.get("extra_info")
    if not isinstance(extra_info, Mapping) or extra_info.get("index") is None:
        return None
    return f"{sample.get('data_source') or 'data'}:{extra_info['index']}"


def with_prompt_key(sampling_params: Mapping[str, Any], key: str | None) -> dict[str, Any]:
    """A copy of verl's sampling-params dict with ``extra_args[das_prompt_key] = key``.

    verl shares one dict between the samples of a prompt, so it is never modified in place.
    """
    params = dict(sampling_params)
    if key is not None:
        params["extra_args"] = {**(params.get("extra_args") or {}), PROMPT_KEY_ARG: key}
    return params


class DASSingleTurnAgentLoop(SingleTurnAgentLoop):
    """:class:`SingleTurnAgentLoop` that tells DAS which dataset prompt each request is."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        return await super().run(with_prompt_key(sampling_params, prompt_key_of(kwargs)), **kwargs)
