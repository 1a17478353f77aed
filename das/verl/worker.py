"""The vLLM worker extension DAS's verl config installs: verl's, plus DAS's stats RPC.

verl passes ``worker_extension_cls`` to vLLM for weight sync (and DAS's config would otherwise
replace it, since ``engine_kwargs.vllm`` is applied last): this class keeps verl's behaviour and
adds :meth:`DASWorkerExtension.das_stats` for ``collective_rpc("das_stats")``.
"""

from __future__ import annotations

from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from das.vllm.proposer import DASWorkerExtension


class DASColocateWorkerExtension(DASWorkerExtension, vLLMColocateWorkerExtension):
    """verl's colocated worker extension with DAS's ``das_stats`` RPC."""
