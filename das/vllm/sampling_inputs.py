"""vLLM 0.32 sampling inputs built by hand: a step's ``SpecDecodeMetadata`` and
``SamplingMetadata`` for a batch, as the runner would build them.

For driving vLLM's real ``Sampler`` and ``RejectionSampler`` without an engine: the patch
point's tests, ``scripts/measure_verify_overhead.py`` and ``scripts/bench_keyed_verify.py``
(which also share :func:`median_seconds`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

DEFAULT_VOCAB = 49152  # SmolLM2's vocabulary


def batch_sizes_arg(text: str) -> list[int]:
    """An argparse ``type``: comma-separated batch sizes, each >= 1."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every batch size must be >= 1")
    return sizes


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``action``, after one warm-up call."""
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def spec_decode_metadata(drafts: list[list[int]]) -> Any:
    """The ``SpecDecodeMetadata`` of a step whose row ``i`` verifies ``drafts[i]``, with the
    logits laid out as the runner's: each row's draft positions, then its bonus position."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    num_drafts = [len(d) for d in drafts]
    cu_drafts = np.cumsum(num_drafts, dtype=np.int32)
    cu_sampled = np.cumsum([n + 1 for n in num_drafts], dtype=np.int32)
    bonus = cu_sampled - 1
    target = [i for row, n in enumerate(num_drafts) for i in range(bonus[row] - n, bonus[row])]
    return SpecDecodeMetadata(
        draft_token_ids=torch.tensor([t for d in drafts for t in d], dtype=torch.int32),
        num_draft_tokens=num_drafts,
        cu_num_draft_tokens=torch.from_numpy(cu_drafts),
        cu_num_sampled_tokens=torch.from_numpy(cu_sampled),
        target_logits_indices=torch.tensor(target, dtype=torch.int32),
        bonus_logits_indices=torch.from_numpy(bonus.astype(np.int32)),
        logits_indices=torch.arange(int(cu_sampled[-1]), dtype=torch.int32),
    )


def sampling_metadata(
    rows: int, greedy: bool, seed: int | None = 0, logprobs: int | None = None
) -> Any:
    """``SamplingMetadata`` for ``rows`` requests: greedy, or random with temperatures from 0.5
    to 1.5 and, unless ``seed`` is None, a seeded generator per row (``seed + row``); no
    penalties, top-k or top-p."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    generators = {}
    if not greedy and seed is not None:
        generators = {row: torch.Generator().manual_seed(seed + row) for row in range(rows)}
    return SamplingMetadata(
        temperature=None if greedy else torch.linspace(0.5, 1.5, rows),
        all_greedy=greedy,
        all_random=not greedy,
        top_p=None,
        top_k=None,
        generators=generators,
        max_num_logprobs=logprobs,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(rows),
        presence_penalties=torch.zeros(rows),
        repetition_penalties=torch.ones(rows),
        output_token_ids=[[] for _ in range(rows)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
        spec_token_ids=[[] for _ in range(rows)],
    )


def stand_in_runner(metadata: Any) -> SimpleNamespace:
    """What ``GPUModelRunner._sample`` reads of its runner, around a real ``Sampler`` and
    ``RejectionSampler`` (no draft probabilities, synchronous scheduling) and ``metadata``."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    sampler = Sampler()
    return SimpleNamespace(
        sampler=sampler,
        rejection_sampler=RejectionSampler(sampler),
        use_async_scheduling=False,
        input_batch=SimpleNamespace(
            sampling_metadata=metadata, update_async_output_token_ids=lambda: None
        ),
        _get_spec_decode_draft_probs=lambda spec: None,
    )


def vllm_runner_sample() -> Callable[[Any, Any, Any], Any]:
    """vLLM's own ``GPUModelRunner._sample``, without DAS's fix 6 if it is applied."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return getattr(GPUModelRunner._sample, "__wrapped__", GPUModelRunner._sample)


def register_cpu_kernels() -> None:
    """vLLM's CPU kernels and Triton overrides, as a CPU worker registers them."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
