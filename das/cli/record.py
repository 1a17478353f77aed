"""``das-rollout record``: record RL-style rollout traces of a model on a prompt set."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from das.cli.args import (
    check_model,
    check_token_budget,
    load_prompts_or_exit,
    positive_float,
    positive_int,
    resolve_dtype_or_exit,
    temperature,
    top_p,
    usage_error,
)
from das.default_model import cache_dir
from das.vllm.engine import DTYPE_CHOICES

logger = logging.getLogger(__name__)


def default_trace_path(dataset: str | None, temperature: float, max_tokens: int) -> Path:
    """``<cache>/traces/<dataset>_t<T>_m<max_tokens>.parquet``, e.g. ``gsm8k_t06_m512``."""
    name = Path(dataset).stem if dataset else "gsm8k"
    name = "".join(char if char.isalnum() else "_" for char in name).strip("_") or "prompts"
    temperature_tag = f"{temperature:.1f}".replace(".", "")
    return cache_dir() / "traces" / f"{name}_t{temperature_tag}_m{max_tokens}.parquet"


def add_record_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``record`` subcommand and its options to ``subparsers``."""
    parser = subparsers.add_parser(
        "record",
        help="record rollouts of the same prompts over several RL steps into a trace",
        description=(
            "Sample NUM_PROMPTS prompts x SAMPLES responses per step for STEPS steps (one "
            "vLLM generate call per step) and append each finished step to a trace file."
        ),
    )
    parser.add_argument("--model", default=None, help="model folder or hub id (default: embedded)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="prompt source: gsm8k (default: the file in $DAS_GSM8K_PATH, else the hub's "
        "openai/gsm8k, else built-in problems when offline), builtin, a .jsonl/.parquet file "
        "with a question/prompt/text column, or a hub name",
    )
    parser.add_argument("--num-prompts", type=positive_int, default=64)
    parser.add_argument(
        "--samples", type=positive_int, default=8, help="responses per prompt per step"
    )
    parser.add_argument("--steps", type=positive_int, default=4, help="RL steps (generate calls)")
    parser.add_argument("--temperature", type=temperature, default=0.6)
    parser.add_argument("--top-p", type=top_p, default=1.0)
    parser.add_argument("--max-tokens", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="engine seed and generator seed")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto (default): bfloat16 on a GPU or a CPU with avx512_bf16/amx_bf16, else float32",
    )
    parser.add_argument("--max-model-len", type=positive_int, default=2048)
    parser.add_argument(
        "--kv-cache-gib", type=positive_float, default=None, help="KV cache size (CPU: 4 GiB)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="trace file, .parquet or .jsonl (default: <cache>/traces/<name>_t<T>_m<max>.parquet)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing trace")
    parser.add_argument("--plot", type=Path, default=None, help="write a length histogram PNG")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def run_record(args: argparse.Namespace) -> int:
    """Handler of ``das-rollout record``; returns the process exit code."""
    # Every argument is checked before the engine starts (tests/test_cli_args.py).
    output = args.output or default_trace_path(args.dataset, args.temperature, args.max_tokens)
    if output.exists() and not args.overwrite:
        usage_error("record", f"trace file {str(output)!r} exists; pass --overwrite to replace it")
    check_token_budget("record", args.max_tokens, args.max_model_len)
    check_model("record", args.model)
    prompts = load_prompts_or_exit("record", args.dataset, args.num_prompts, args.seed)
    dtype = resolve_dtype_or_exit("record", args.dtype)

    from das.vllm.engine import make_llm
    from das.vllm.record import length_summary, plot_length_histogram, record_rollouts

    llm = make_llm(
        args.model,
        dtype=dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
        kv_cache_gib=args.kv_cache_gib,
    )
    records = record_rollouts(
        args.model,
        prompts,
        num_samples=args.samples,
        num_steps=args.steps,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        output_path=output,
        llm=llm,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if not records:
        logger.error("no request finished; nothing was recorded")
        return 1
    if args.plot is not None:
        plot_length_histogram(records, args.plot, max_tokens=args.max_tokens)
        logger.info("wrote length histogram %s", args.plot)
    summary = length_summary(records)
    print(f"trace      {output}")
    print(f"rollouts   {summary.num_records}")
    print(f"mean       {summary.mean:.1f} tokens")
    print(f"p50        {summary.p50:.0f}")
    print(f"p90        {summary.p90:.0f}")
    print(f"max        {summary.max}")
    print(f"truncated  {100 * summary.share_truncated:.1f}% (hit --max-tokens {args.max_tokens})")
    return 0
