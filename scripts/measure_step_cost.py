"""Measure vLLM's decode-step time against tokens per step on this machine.

For each batch size B, B requests of random prompt tokens decode N tokens with ``ignore_eos``;
the per-step time is ``(t(N) - t(1)) / (N - 1)``, which removes prefill. A step of B requests
verifying k drafts each processes B * (1 + k) tokens, so this curve (tokens per step -> seconds)
is what the cost-model policy and the replay need. Writes a JSON profile that
``policies.profiles.load_profile`` fits (``das-rollout replay --cost cpu=PATH``).

    python scripts/measure_step_cost.py --output benchmarks/results/step_cost_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("measure_step_cost")


def measure(llm, batch_size: int, prompt_tokens: int, decode_tokens: int, seed: int) -> float:
    from vllm import SamplingParams

    rng = np.random.default_rng(seed)
    prompts = [
        {"prompt_token_ids": rng.integers(1000, 20000, size=prompt_tokens).tolist()}
        for _ in range(batch_size)
    ]

    def timed(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started

    timed(2)  # warm the shapes of this batch size
    return (timed(decode_tokens) - timed(1)) / (decode_tokens - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/step_cost_cpu.json")
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from das.vllm.engine import make_llm
    from policies.profiles import fit_measured_steps

    llm = make_llm(args.model, dtype=args.dtype, max_model_len=1024)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    step_s = []
    for batch_size in batch_sizes:
        step_s.append(measure(llm, batch_size, args.prompt_tokens, args.decode_tokens, batch_size))
        logger.info("batch %4d: %.2f ms per decode step", batch_size, step_s[-1] * 1e3)
    context = [b * (args.prompt_tokens + args.decode_tokens // 2) for b in batch_sizes]
    profile = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": f"{platform.machine()} CPU, {platform.processor() or 'unknown'}",
        "model": args.model or "SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "num_tokens": batch_sizes,
        "step_s": step_s,
        # Context grows in proportion to the batch here, so a per-context-token term cannot be
        # told apart from the per-token one: the fit uses tokens only, kept for information.
        "measured_context_tokens": context,
    }
    fitted = fit_measured_steps(profile, str(args.output))
    profile["fitted"] = dataclasses.asdict(fitted)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(profile, indent=1))
    print(f"{'tokens/step':>12}{'ms/step':>10}{'vs 1':>8}{'fit ms':>10}")
    for tokens, seconds in zip(batch_sizes, step_s, strict=True):
        print(
            f"{tokens:>12}{seconds * 1e3:>10.2f}{seconds / step_s[0]:>8.2f}"
            f"{fitted.step_time(tokens) * 1e3:>10.2f}"
        )
    print(f"fitted: {fitted.to_spec()}  ->  {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
