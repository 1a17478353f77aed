"""Measure what vLLM's verification path adds to a step's sampling, on this machine.

vLLM 0.32 sends every step of a speculative engine through its ``RejectionSampler``; DAS's fix 6
(``das.vllm.plugin``) samples a step without drafts as a plain engine does. For each batch size
B, with real vLLM ``Sampler``/``RejectionSampler`` objects on ``B x vocab`` bf16 logits
(temperature sampling, vLLM's CPU kernels), this times the median of:

* ``plain``: the sampler of a non-speculative engine;
* ``rejection_no_draft``: vLLM's path for a speculative step without drafts (unpatched);
* ``fixed_no_draft``: the same step with fix 6;
* ``rejection_one_draft``: a step where one row verifies one draft token.

``rejection_one_draft - plain`` is what the first draft of a step costs on top of its token,
and its slope in B is the cost model's ``c_spec_request`` (seconds per request of a step that
verifies any draft). Writes JSON::

    python scripts/measure_verify_overhead.py --output benchmarks/results/verify_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

from das.atomic_json import write_json_atomically
from das.vllm.sampling_inputs import DEFAULT_VOCAB, batch_sizes_arg, median_seconds

logger = logging.getLogger("measure_verify_overhead")


def measure_batch(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    import torch

    from das.vllm import plugin as vllm_plugin
    from das.vllm.sampling_inputs import (
        sampling_metadata,
        spec_decode_metadata,
        stand_in_runner,
        vllm_runner_sample,
    )

    metadata = sampling_metadata(rows, greedy=False, seed=None)
    runner = stand_in_runner(metadata)
    sampler = runner.sampler
    vllm_sample = vllm_runner_sample()
    generator = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows + 1, vocab, generator=generator) * 3).to(torch.bfloat16)
    no_drafts = spec_decode_metadata([[] for _ in range(rows)])
    one_draft = spec_decode_metadata([[7]] + [[] for _ in range(rows - 1)])
    return {
        "plain": median_seconds(lambda: sampler(logits[:rows], metadata), repeats),
        "rejection_no_draft": median_seconds(
            lambda: vllm_sample(runner, logits[:rows], no_drafts), repeats
        ),
        "fixed_no_draft": median_seconds(
            lambda: vllm_plugin.sample_without_drafts(runner, logits[:rows], no_drafts), repeats
        ),
        "rejection_one_draft": median_seconds(
            lambda: vllm_sample(runner, logits, one_draft), repeats
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=batch_sizes_arg, default="16,64,128,256")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=None, help="JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.vocab < 8 or args.repeats < 1:
        parser.error(f"--vocab {args.vocab} must be >= 8 and --repeats {args.repeats} >= 1")
    batch_sizes = args.batch_sizes

    from das.vllm import plugin as vllm_plugin
    from das.vllm.sampling_inputs import register_cpu_kernels

    register_cpu_kernels()
    if not vllm_plugin.register():
        logger.error("das.vllm.plugin refused this vLLM: %s", vllm_plugin.refusal())
        return 1
    results = {}
    for rows in batch_sizes:
        results[rows] = measure_batch(rows, args.vocab, args.repeats)
        logger.info(
            "B=%4d  " + "  ".join(f"{name} %.2f ms" for name in results[rows]),
            rows,
            *(1e3 * value for value in results[rows].values()),
        )
    extra = np.array([results[b]["rejection_one_draft"] - results[b]["plain"] for b in batch_sizes])
    slope, intercept = np.polyfit(batch_sizes, extra, 1) if len(batch_sizes) > 1 else (0.0, 0.0)
    logger.info(
        "first draft of a step: %.2f ms + %.1f us per request (c_spec_request)",
        1e3 * intercept,
        1e6 * slope,
    )
    report = {
        "command": " ".join(
            ["python", "scripts/measure_verify_overhead.py", *map(shlex.quote, sys.argv[1:])]
        ),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "vocab": args.vocab,
        "repeats": args.repeats,
        "seconds": {str(b): results[b] for b in batch_sizes},
        "fitted": {"c_spec_request": float(slope), "first_draft_intercept_s": float(intercept)},
    }
    if args.output is not None:
        write_json_atomically(report, args.output)
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
