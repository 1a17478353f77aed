"""``das-rollout run``: live multi-step rollouts on vLLM, one engine per speculation method."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import signal
import sys
from pathlib import Path

from das.bench.live import COMPARED_METHODS, LIVE_METHOD_HELP, LIVE_METHODS, LiveWorkload
from das.cli.args import (
    add_das_option,
    check_model,
    check_token_budget,
    load_prompts_or_exit,
    non_negative_int,
    parse_das_options,
    positive_float,
    positive_int,
    resolve_dtype_or_exit,
    temperature,
    top_p,
    usage_error,
)
from das.vllm.engine import DTYPE_CHOICES

logger = logging.getLogger(__name__)


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand and its options to ``subparsers``."""
    methods_help = "; ".join(f"{name}: {text}" for name, text in LIVE_METHOD_HELP.items())
    defaults = LiveWorkload()
    parser = subparsers.add_parser(
        "run",
        help="run live RL-style rollout steps on vLLM under each speculation method",
        description=(
            "Start one vLLM engine per method (identical settings otherwise), run STEPS generate "
            "calls of NUM_PROMPTS x SAMPLES requests on each, and report per-step wall time, "
            "engine iterations, tokens/s and acceptance, plus a greedy identity probe against "
            "no speculation. Methods: " + methods_help
        ),
    )
    parser.add_argument(
        "--methods",
        default=",".join(COMPARED_METHODS),
        help="comma-separated, run in this order after none (default: %(default)s)",
    )
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded)")
    parser.add_argument("--dataset", default=None, help="prompt source (default: gsm8k)")
    parser.add_argument("--num-prompts", type=positive_int, default=defaults.num_prompts)
    parser.add_argument("--samples", type=positive_int, default=defaults.num_samples)
    parser.add_argument("--steps", type=positive_int, default=defaults.num_steps)
    parser.add_argument("--max-tokens", type=positive_int, default=defaults.max_tokens)
    parser.add_argument("--temperature", type=temperature, default=defaults.temperature)
    parser.add_argument("--top-p", type=top_p, default=defaults.top_p)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="engine seed")
    parser.add_argument(
        "--k", type=positive_int, default=defaults.num_speculative_tokens, help="draft tokens (K)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto (default): bfloat16 on a GPU or a CPU with avx512_bf16/amx_bf16, else float32",
    )
    parser.add_argument("--max-model-len", type=positive_int, default=defaults.max_model_len)
    parser.add_argument("--kv-cache-gib", type=positive_float, default=defaults.kv_cache_gib)
    parser.add_argument(
        "--probe-prompts",
        type=non_negative_int,
        default=defaults.probe_prompts,
        help="prompts in the final greedy identity probe (0: no probe)",
    )
    parser.add_argument("--probe-tokens", type=non_negative_int, default=defaults.probe_tokens)
    parser.add_argument(
        "--keyed",
        action="store_true",
        help="position-keyed sampling (seeded per prompt, sample and step): every method "
        "samples the same rollouts token for token, so steps compare like for like",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start every engine first and run each step on all of them in turn (robust to a "
        "machine whose speed drifts; holds every engine's KV cache at once)",
    )
    add_das_option(parser, "engines")
    parser.add_argument("--json", type=Path, help="write results here (after every step)")
    parser.add_argument("--plot", type=Path, help="write a PNG of per-step time and iterations")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def unwind_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a job scheduler's stop) unwind the stack as Ctrl-C does.

    Python's default SIGTERM action ends the process at once: ``finally`` blocks do not run,
    and vLLM's engine-core and worker processes outlive it (seen here: two orphaned engines
    holding 11 GiB). Raising ``SystemExit`` instead shuts every engine down; the JSON written
    after each step stays as it was.
    """

    def handler(signum: int, frame: object) -> None:
        logger.warning("received signal %d: shutting the engines down", signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_run(args: argparse.Namespace) -> int:
    """Handler of ``das-rollout run``; returns the process exit code."""
    # Every argument is checked before an engine starts (tests/test_cli_args.py).
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LIVE_METHODS]
    if unknown or not methods:
        usage_error(
            "run", f"--methods {args.methods!r}: unknown method(s) {unknown}; known: {LIVE_METHODS}"
        )
    check_token_budget("run", args.max_tokens, args.max_model_len)
    try:
        workload = LiveWorkload(
            num_prompts=args.num_prompts,
            num_samples=args.samples,
            num_steps=args.steps,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            num_speculative_tokens=args.k,
            dataset=args.dataset,
            model=args.model,
            dtype=args.dtype,  # "auto" is resolved below, once every argument is valid
            max_model_len=args.max_model_len,
            kv_cache_gib=args.kv_cache_gib,
            probe_prompts=args.probe_prompts,
            probe_tokens=args.probe_tokens,
            keyed=args.keyed,
            das_options=parse_das_options(args.das_option),
        )
    except ValueError as error:
        usage_error("run", str(error))
    check_model("run", args.model)
    prompts = load_prompts_or_exit("run", args.dataset, args.num_prompts, args.seed)
    workload = dataclasses.replace(workload, dtype=resolve_dtype_or_exit("run", args.dtype))

    unwind_on_sigterm()
    from das.atomic_json import write_json_atomically
    from das.bench.live import run_comparison
    from das.bench.live_report import build_report, format_table, plot_live

    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    title = (
        f"{len(prompts)} prompts x {args.samples} x {args.steps} steps, {args.max_tokens} tokens, "
        f"T={args.temperature}, K={args.k}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)

    def save(runs: dict) -> None:  # after every step: a later crash loses nothing measured
        if args.json:
            write_json_atomically(build_report(runs, workload, command), args.json)
            logger.info("wrote %s", args.json)
        if args.plot:
            plot_live(runs, args.plot, title)

    runs = run_comparison(
        methods,
        workload,
        prompts,
        on_method_done=save,
        progress=not args.no_progress,
        interleave=args.interleave,
    )
    print(format_table(runs, workload))
    report = build_report(runs, workload, command)
    print(f"greedy identity probe (vs none): {report['greedy_identical']}")
    return 1 if any(run.error for run in runs.values()) else 0
