"""One call to run vLLM with DAS speculation, and a way to read its counters.

    from das.vllm.api import das_llm, das_stats
    llm = das_llm(None, das={"policy": "cost_model"}, num_speculative_tokens=8, dtype="float32")
    for step in range(num_steps):            # one generate() = one RL step
        outputs = llm.generate(prompts, params)
    print(das_stats(llm))

Passing the engine arguments yourself works the same (e.g. verl's ``engine_kwargs.vllm``)::

    LLM(model, **das_speculative_config({"window_steps": 3}, num_speculative_tokens=8))

The ``das`` plugin (entry point ``vllm.general_plugins``) must be installed in the environment
(``pip install -e .``); it patches each vLLM process once (see :mod:`das.vllm.plugin`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from das.config import DASConfig

if TYPE_CHECKING:
    import vllm

logger = logging.getLogger(__name__)

PROPOSER_CLASS = "das.vllm.proposer.DASProposer"
WORKER_EXTENSION = "das.vllm.proposer.DASWorkerExtension"
_SPEC_METRICS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


def das_speculative_config(
    das: Mapping[str, Any] | DASConfig | None = None,
    num_speculative_tokens: int | None = None,
) -> dict[str, Any]:
    """The engine arguments that turn DAS on: ``speculative_config`` and ``additional_config``.

    ``num_speculative_tokens`` (K) defaults to ``das["num_speculative_tokens"]`` or DASConfig's
    default. Raises ``ValueError`` naming unknown DAS keys or a K that disagrees with ``das``.
    """
    values = das.to_dict() if isinstance(das, DASConfig) else dict(das or {})
    if num_speculative_tokens is not None:
        given = values.setdefault("num_speculative_tokens", num_speculative_tokens)
        if given != num_speculative_tokens:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens} disagrees with "
                f"das['num_speculative_tokens']={given}"
            )
    config = DASConfig.from_dict(values)
    return {
        "speculative_config": {
            "method": "custom_class",
            "model": PROPOSER_CLASS,
            "num_speculative_tokens": config.num_speculative_tokens,
        },
        "additional_config": {"das": config.to_dict()},
    }


def das_llm(
    model: str | None = None,
    das: Mapping[str, Any] | DASConfig | None = None,
    num_speculative_tokens: int | None = None,
    **engine_kwargs: Any,
) -> vllm.LLM:
    """A ``vllm.LLM`` (through :func:`das.vllm.engine.make_llm`) that drafts with DAS.

    ``engine_kwargs`` go to vLLM unchanged; an ``additional_config`` of your own is kept (its
    ``"das"`` key is DAS's). ``worker_extension_cls`` defaults to DAS's so that
    :func:`das_stats` can read the drafter. Invalid DAS settings raise ``ValueError`` before
    any engine starts.
    """
    from das.vllm.engine import make_llm

    if "speculative_config" in engine_kwargs:
        raise ValueError("das_llm sets speculative_config itself; do not pass one")
    settings = das_speculative_config(das, num_speculative_tokens)
    additional = dict(engine_kwargs.pop("additional_config", None) or {})
    if "das" in additional:
        raise ValueError("pass DAS settings as das=..., not as additional_config['das']")
    additional.update(settings["additional_config"])
    engine_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    return make_llm(
        model,
        speculative_config=settings["speculative_config"],
        additional_config=additional,
        **engine_kwargs,
    )


def spec_decode_counters(llm: vllm.LLM) -> dict[str, int]:
    """vLLM's own speculative decoding counters (needs ``disable_log_stats=False``)."""
    counters = dict.fromkeys(_SPEC_METRICS.values(), 0)
    for metric in llm.get_metrics():
        name = _SPEC_METRICS.get(metric.name)
        if name is not None:
            counters[name] += int(getattr(metric, "value", 0))
    return counters


def das_stats(llm: vllm.LLM, settle_s: float = 5.0) -> dict[str, Any]:
    """vLLM's counters plus, with DAS's worker extension, the drafter's own (``"drafter"``).

    ``drafter`` holds one dict per worker (None for a worker without DAS); it is absent when the
    RPC fails, e.g. for an engine started without :data:`WORKER_EXTENSION`.

    Workers learn that a request finished from the engine's next step, which vLLM's engine core
    runs on its own after ``generate()`` has returned. So that a snapshot taken between RL steps
    counts every finished rollout, an idle engine is read again (for up to ``settle_s`` seconds)
    until no worker still tracks a running request.
    """
    stats: dict[str, Any] = {"vllm": spec_decode_counters(llm)}
    deadline = time.monotonic() + settle_s
    try:
        drafters = llm.collective_rpc("das_stats")
        while (
            not llm.llm_engine.has_unfinished_requests()
            and any(worker and worker["num_running"] for worker in drafters)
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
            drafters = llm.collective_rpc("das_stats")
        stats["drafter"] = drafters
    except Exception as error:  # no DAS worker extension: the RPC is unknown to the worker
        logger.debug("das_stats RPC failed: %r", error)
    return stats
