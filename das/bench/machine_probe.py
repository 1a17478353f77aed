"""How fast the machine is right now: the wall time of a fixed piece of decode-like work.

On a shared virtual machine the same engine step can take 2-3x longer from one minute to the
next while every in-guest reading (CPU seconds, steal time, page faults) stays the same:
measured here, a no-speculation engine ran 518-iteration RL steps in 80 s and, 20 minutes
later, 262-iteration steps in 133 s. A per-step ratio between two engines is only meaningful
if the machine ran both at the same speed, so the live benchmark times this probe right
before and right after every engine step (in its own process, while every engine is idle).

The probe is the two kinds of work a CPU decode step is made of: bf16 matrix products of a
decode batch's shape (compute) and a bf16 -> fp32 copy of a batch of logits (memory).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

__all__ = ["probe_seconds"]

# A 256-request decode batch through a 2048-wide projection, and 256 rows of a 49k vocabulary.
_BATCH, _WIDTH, _VOCAB = 256, 2048, 49152


@functools.cache
def _probe_inputs() -> tuple[Any, Any, Any]:
    """The probe's fixed bf16 inputs (about 34 MB), drawn once per process: the benchmark
    probes twice per engine step, and drawing 13M normals each time would be wasted work."""
    import torch

    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(_BATCH, _WIDTH, generator=generator).to(torch.bfloat16)
    weights = torch.randn(_WIDTH, _WIDTH, generator=generator).to(torch.bfloat16)
    logits = torch.randn(_BATCH, _VOCAB, generator=generator).to(torch.bfloat16)
    return activations, weights, logits


def probe_seconds(repeats: int = 3, matmuls: int = 8, copies: int = 4) -> float:
    """Median wall seconds, over ``repeats`` trials, of ``matmuls`` bf16 products of a
    (256 x 2048) by (2048 x 2048) matrix plus ``copies`` bf16 -> fp32 copies of 256 x 49152
    logits, on this process's torch threads. Fixed inputs, so only the machine varies."""
    import torch  # here, not at import: the CLI's modules stay light

    activations, weights, logits = _probe_inputs()
    torch.matmul(activations, weights)  # first-call costs (kernel selection) stay out
    trials = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(matmuls):
            torch.matmul(activations, weights)
        for _ in range(copies):
            logits.to(torch.float32)
        trials.append(time.perf_counter() - started)
    return statistics.median(trials)
