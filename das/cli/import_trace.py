"""``das-rollout import FILE...``: turn multi-sample generation files into a rollout trace.

Each file (a checkpoint, a policy variant) becomes one step, in the order given. The formats
(Qwen2.5-Math evaluation output, CodeT samples, a generic JSONL) are described in
:mod:`rollouts.import_formats`; the step rules in :mod:`rollouts.importers`. The tokenizer used
is written to ``<trace stem>.meta.json`` beside the trace, as ``record`` does.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rollouts.import_formats import FORMATS
from rollouts.trace import JSONL_SUFFIX, PARQUET_SUFFIX

logger = logging.getLogger(__name__)


def add_import_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import`` subcommand and its options to ``subparsers``."""
    parser = subparsers.add_parser(
        "import",
        help="convert multi-sample generation files (one per checkpoint) into a trace",
        description=(
            "Read generation files (JSONL, plain or gzip) holding prompt texts and sampled "
            "responses, tokenize them and write a trace: each file one step, in the order given. "
            "Formats: qwen_math (question, code), codet (prompt, samples), generic (prompt, "
            "response or responses, optional step/checkpoint and finish_reason)."
        ),
    )
    parser.add_argument("files", type=Path, nargs="+", help="generation files, in step order")
    parser.add_argument(
        "--output", type=Path, required=True, help="trace file to write (.parquet or .jsonl)"
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", *FORMATS],
        help="file format (default: detected from the fields of each file's first line)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or hub id (default: the embedded model's)",
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="render each prompt as a user turn of the tokenizer's chat template "
        "(default: tokenize the prompt as plain text)",
    )
    parser.add_argument(
        "--step-per-file",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each file starts new steps (default); --no-step-per-file: files share steps",
    )
    parser.add_argument(
        "--samples-per-step",
        type=int,
        default=None,
        help="split each step: the first N samples of every prompt stay, the next N form the "
        "following step, ... (default: no split)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing trace")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _number_in_name(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.name)
    return int(numbers[-1]) if numbers else None


def warn_if_unordered(files: Sequence[Path]) -> None:
    """Log a warning when numbered file names (checkpoint-21, -35, ...) are not in numeric
    order: a shell glob sorts ``checkpoint-105`` before ``checkpoint-21``."""
    numbers = [_number_in_name(path) for path in files]
    if None in numbers or numbers == sorted(numbers):
        return
    logger.warning(
        "files are not in numeric order of their names (%s); steps follow the order given",
        ", ".join(path.name for path in files),
    )


def load_tokenizer(name: str | None) -> tuple[Any, str]:
    """The tokenizer and the name/path it was loaded from (the embedded model's by default)."""
    from transformers import AutoTokenizer

    from das.default_model import resolve_model

    source = resolve_model(name)
    return AutoTokenizer.from_pretrained(source), source


def run_import(args: argparse.Namespace) -> int:
    """Handler of ``das-rollout import``; returns the process exit code."""
    try:
        return _run_import(args)
    except ValueError as error:
        raise SystemExit(f"das-rollout import: {error}") from error


def _run_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from das.atomic_json import write_json_atomically
    from das.vllm.record import metadata_path_for
    from rollouts.import_formats import read_generation_file
    from rollouts.importers import assign_steps, summarize_import, tokenize_samples
    from rollouts.trace import write_trace

    output: Path = args.output
    if output.suffix.lower() not in (PARQUET_SUFFIX, JSONL_SUFFIX):
        raise ValueError(f"--output={output} must end in {PARQUET_SUFFIX} or {JSONL_SUFFIX}")
    if output.exists() and not args.overwrite:
        logger.error("trace file %s exists; pass --overwrite to replace it", output)
        return 2
    warn_if_unordered(args.files)
    files = [
        read_generation_file(path, args.format)
        for path in tqdm(args.files, unit="file", desc="read", disable=args.no_progress)
    ]
    for generation_file in files:
        logger.info(
            "%s: %s format, %d samples",
            generation_file.path,
            generation_file.format,
            len(generation_file.samples),
        )
    assigned, sources = assign_steps(
        files, step_per_file=args.step_per_file, samples_per_step=args.samples_per_step
    )
    tokenizer, tokenizer_source = load_tokenizer(args.tokenizer)
    records = tokenize_samples(
        assigned, tokenizer, chat_template=args.chat_template, progress=not args.no_progress
    )
    summary = summarize_import(records)
    metadata = {
        "source": "das-rollout import",
        "tokenizer": tokenizer_source,
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": bool(args.chat_template),
        "step_per_file": bool(args.step_per_file),
        "samples_per_step": args.samples_per_step,
        "files": [
            {"path": str(f.path), "format": f.format, "num_samples": len(f.samples)} for f in files
        ],
        "steps": [
            {
                **asdict(source),
                "num_records": sum(r.step == source.step for r in records),
                "num_generated_tokens": sum(
                    r.num_response_tokens for r in records if r.step == source.step
                ),
            }
            for source in sources
        ],
        "summary": asdict(summary),
    }
    # Both files are written through temporary siblings; if the metadata cannot be written the
    # new trace is removed again, so an import leaves both files or neither.
    write_trace(records, output)
    try:
        write_json_atomically(metadata, metadata_path_for(output))
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    print(f"trace      {output}")
    print(f"tokenizer  {tokenizer_source}")
    print(f"imported   {summary.describe()}")
    return 0
