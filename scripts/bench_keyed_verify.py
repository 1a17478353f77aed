"""What verifying drafts costs with position-keyed sampling, before and after skipping vLLM's pass.

With position-keyed sampling (``das.vllm.keyed``) a keyed row's drafts are verified against
its keyed draws. vLLM's own ``rejection_sample`` used to run as well, for every row, and its
output for keyed rows was then overwritten: a softmax and a recovered-token draw over the
vocabulary at every draft position, thrown away. When every row of the batch is keyed (the
benchmark's ``--keyed`` runs, an RL run with seeded requests), the patched seam now skips it.

For each batch size, on ``rows x k`` draft positions of random fp32 logits (SmolLM2's
vocabulary), each row's drafts accepted for a uniformly drawn prefix, this times the median of:

* ``before``: vLLM's ``rejection_sample`` plus the keyed verification (what every keyed step
  with drafts paid);
* ``now``: the patched seam with every row keyed;
* ``vllm_unkeyed``: vLLM's ``rejection_sample`` alone (what an unkeyed engine pays).

Prints ``before / now`` per batch size and writes JSON::

    python scripts/bench_keyed_verify.py --json benchmarks/results/keyed_verify_cpu.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from das.atomic_json import write_json_atomically
from das.vllm.sampling_inputs import DEFAULT_VOCAB, batch_sizes_arg, median_seconds

logger = logging.getLogger("bench_keyed_verify")


def measure_batch(rows: int, k: int, vocab: int, repeats: int) -> dict[str, Any]:
    """Median seconds of the three verification paths for one batch shape."""
    import torch
    from vllm.v1.sample import rejection_sampler

    from das.vllm import keyed as vllm_keyed
    from das.vllm.keyed import keyed_sample, keyed_verify, position_keys
    from das.vllm.sampling_inputs import sampling_metadata

    original = rejection_sampler._DAS_ORIGINAL_REJECTION_SAMPLE
    generator = torch.Generator().manual_seed(rows * 100 + k)
    logits = torch.randn(rows * k, vocab, generator=generator) * 3
    seeds = np.arange(1000, 1000 + rows, dtype=object)
    positions = np.random.default_rng(rows).integers(0, 400, rows)
    accepted = np.random.default_rng(rows + 1).integers(0, k + 1, rows)
    # Each row's drafts: its keyed draws for the accepted prefix, then a wrong token.
    draws = [
        keyed_sample(
            logits[r * k : (r + 1) * k], position_keys([seeds[r]] * k, positions[r] + np.arange(k))
        )
        for r in range(rows)
    ]
    drafts = torch.cat(
        [
            torch.where(torch.arange(k) < accepted[r], draws[r], (draws[r] + 1) % vocab)
            for r in range(rows)
        ]
    ).to(torch.int32)
    num_drafts = [k] * rows
    cu_drafts = torch.arange(k, k * rows + 1, k, dtype=torch.int32)
    bonus = torch.zeros(rows, 1, dtype=torch.int32)
    metadata = sampling_metadata(rows, greedy=False, seed=None)
    step = vllm_keyed.KeyedStep(
        sampler=None,
        num_reqs=rows,
        rows=np.arange(rows),
        seeds=seeds,
        positions=positions,
        num_drafts=np.full(rows, k),
    )
    args = (drafts, num_drafts, k, cu_drafts, None, logits, bonus, metadata)

    def before() -> None:
        original(*args)
        keyed_verify(drafts, num_drafts, logits, bonus, step.rows, seeds, positions, k)

    def now() -> torch.Tensor:
        vllm_keyed._step = step
        try:
            return rejection_sampler.rejection_sample(*args)
        finally:
            vllm_keyed._step = None

    # The patched seam emits, per row, the accepted draws and the draw at the first rejection.
    output = now()
    for r in range(rows):
        emitted = min(int(accepted[r]) + 1, k)
        assert output[r, :emitted].tolist() == draws[r][:emitted].tolist(), r
    return {
        "rows": rows,
        "k": k,
        "mean_accepted": float(accepted.mean()),
        "before_s": median_seconds(before, repeats),
        "now_s": median_seconds(now, repeats),
        "vllm_unkeyed_s": median_seconds(lambda: original(*args), repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=batch_sizes_arg, default="16,64,256")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per row")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.k < 1 or args.vocab < 8 or args.repeats < 1:
        parser.error(f"--k {args.k} >= 1, --vocab {args.vocab} >= 8, --repeats {args.repeats} >= 1")

    from das.vllm import plugin as vllm_plugin
    from das.vllm.sampling_inputs import register_cpu_kernels

    register_cpu_kernels()
    if not vllm_plugin.register():
        logger.error("das.vllm.plugin refused this vLLM: %s", vllm_plugin.refusal())
        return 1
    results = []
    for rows in args.batch_sizes:
        row = measure_batch(rows, args.k, args.vocab, args.repeats)
        row["before_over_now"] = row["before_s"] / row["now_s"]
        results.append(row)
        logger.info(
            "B=%4d k=%d: before %.1f ms, now %.1f ms (%.2fx), vLLM unkeyed %.1f ms",
            rows,
            args.k,
            1e3 * row["before_s"],
            1e3 * row["now_s"],
            row["before_over_now"],
            1e3 * row["vllm_unkeyed_s"],
        )
    report = {
        "command": " ".join(
            ["python", "scripts/bench_keyed_verify.py", *map(shlex.quote, sys.argv[1:])]
        ),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "vocab": args.vocab,
        "repeats": args.repeats,
        "batches": results,
    }
    if args.json is not None:
        write_json_atomically(report, args.json)
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
