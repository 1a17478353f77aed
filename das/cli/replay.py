"""``das-rollout replay TRACE``: compare drafting methods offline on a recorded trace."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from das.cli.args import add_das_option, parse_das_options
from das.methods import METHOD_HELP, METHODS
from policies.profiles import MEASURED_CPU_PROFILE, TABLE_PROFILES, CostModel, load_cost_model
from rollouts.replay import VLLM_CPU_MAX_NUM_SEQS, VLLM_GPU_MAX_NUM_SEQS, ReplayConfig

logger = logging.getLogger(__name__)


def default_cost_specs() -> list[str]:
    """The packaged 2-core CPU curve (``cpu``) and the measured H100 whole-step table."""
    specs = ["h100=h100"]
    if MEASURED_CPU_PROFILE.is_file():
        specs.insert(0, "cpu=cpu")
    return specs


def parse_cost_models(specs: list[str]) -> dict[str, CostModel]:
    """``NAME=SPEC`` or SPEC; SPEC: a measured table's name, a profile name, a JSON path or
    ``c_base,c_tok[,knee...]``."""
    models = {}
    for spec in specs:
        name, _, value = spec.partition("=") if "=" in spec else (spec, "", spec)
        try:
            models[name] = load_cost_model(value)
        except (ValueError, OSError) as error:
            raise SystemExit(f"das-rollout replay: bad --cost {spec!r}: {error}") from error
    return models


def parse_das_options_or_exit(items: list[str]) -> dict[str, Any]:
    """``--das-option`` items as DAS config overrides, checked against :class:`DASConfig`
    before any replay starts."""
    from das.config import DASConfig

    try:
        options = dict(parse_das_options(items))
        DASConfig.from_dict(options)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"das-rollout replay: {error}") from error
    return options


def add_replay_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    methods_help = "; ".join(f"{name}: {text}" for name, text in METHOD_HELP.items())
    parser = subparsers.add_parser(
        "replay",
        help="replay a recorded trace under drafting methods and cost models",
        description="Replay a recorded multi-step trace offline. Methods: " + methods_help,
    )
    parser.add_argument("trace", type=Path, help="trace file (.parquet or .jsonl)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated methods (default: all)"
    )
    parser.add_argument(
        "--cost",
        action="append",
        default=None,
        help="NAME=SPEC cost model, repeatable; SPEC: a measured step table ("
        + ", ".join(sorted(TABLE_PROFILES))
        + "), a GEMM roofline (h100_7b, h100_qwen3_8b), a JSON profile, or "
        "c_base,c_tok[,knee] in seconds (default: cpu=<measured CPU curve> and h100=h100)",
    )
    parser.add_argument("--k", type=int, default=16, help="max draft tokens per request (16)")
    parser.add_argument(
        "--dataset-steps",
        type=int,
        default=1,
        metavar="E",
        help="replay as if the dataset held E times a step's prompts: each step's prompts are "
        "split into E groups and a prompt returns every E steps (default: 1, as recorded)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=VLLM_GPU_MAX_NUM_SEQS,
        help="most requests the modelled engine runs at once, the rest wait (vLLM's "
        f"max_num_seqs; default {VLLM_GPU_MAX_NUM_SEQS}, vLLM 0.32's on an H100-class GPU; "
        f"{VLLM_CPU_MAX_NUM_SEQS} on a CPU)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="replays run in parallel (default: CPU count)"
    )
    add_das_option(parser, "drafters")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of per-step time and acceptance")
    return parser


def run_replay(args: argparse.Namespace) -> int:
    from das.bench.replay_report import compare_methods, format_table, plot_comparison
    from rollouts.trace import read_trace

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"das-rollout replay: unknown method(s) {unknown}; known: {METHODS}")
    if args.k <= 0:
        raise SystemExit(f"das-rollout replay: --k={args.k} must be > 0")
    if args.max_num_seqs < 1:
        raise SystemExit(f"das-rollout replay: --max-num-seqs={args.max_num_seqs} must be >= 1")
    cost_models = parse_cost_models(args.cost or default_cost_specs())
    das_options = parse_das_options_or_exit(args.das_option)
    try:
        records = read_trace(args.trace)
        if args.dataset_steps != 1:
            from rollouts.dataset_steps import spread_steps
            from rollouts.trace import group_by_step

            spread = spread_steps(group_by_step(records), args.dataset_steps)
            records = [record for step_records in spread.values() for record in step_records]
    except ValueError as error:
        raise SystemExit(f"das-rollout replay: {error}") from error
    comparison = compare_methods(
        records,
        methods,
        cost_models,
        num_speculative_tokens=args.k,
        jobs=args.jobs,
        config=ReplayConfig(max_num_seqs=args.max_num_seqs),
        das_options=das_options,
    )
    summary = comparison.trace_summary
    print(
        f"trace {args.trace}: {summary['num_rollouts']} rollouts, {summary['num_prompts']} "
        f"prompts, steps {summary['steps']}, mean {summary['mean_response_tokens']:.0f} tokens, "
        f"{summary['share_truncated']:.0%} truncated; replayed in {comparison.replay_wall_s:.1f} s"
    )
    print(format_table(comparison))
    if args.json:
        command = "das-rollout " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comparison.to_json(command), indent=1))
        logger.info("wrote %s", args.json)
    if args.plot:
        logger.info("wrote %s", plot_comparison(comparison, args.plot))
    return 0
