"""Argument types and checks shared by the ``das-rollout`` subcommands.

Each type turns a bad value into an argparse error naming it (exit code 2), so a subcommand
rejects its arguments before it loads prompts or starts an engine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn


def positive_int(text: str) -> int:
    """An integer > 0 (``--num-prompts``, ``--samples``, ``--steps``, ``--max-tokens``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (counts where 0 means "none", e.g. ``--probe-prompts``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative integer")
    return value


def _finite_float(text: str, requirement: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: a finite number >= 0."""
    value = _finite_float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def top_p(text: str) -> float:
    """A nucleus sampling mass in (0, 1]."""
    value = _finite_float(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in (0, 1]")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``--kv-cache-gib``)."""
    value = _finite_float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def usage_error(command: str, message: str) -> NoReturn:
    """Print ``das-rollout COMMAND: error: MESSAGE`` to stderr and exit with code 2 (argparse's)."""
    print(f"das-rollout {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_model(command: str, model: str | None) -> None:
    """Exit with code 2 when ``--model`` is neither a causal LM folder nor a hub id."""
    if model in (None, "", "default"):
        return
    from das.vllm.engine import validate_causal_lm

    try:
        validate_causal_lm(model)
    except ValueError as error:
        usage_error(command, f"argument --model: {error}")


def check_output_dir(command: str, option: str, path: Path | None) -> None:
    """Exit with code 2 when ``path`` exists but is not a folder."""
    if path is not None and path.exists() and not path.is_dir():
        usage_error(command, f"argument {option}: {str(path)!r} exists and is not a folder")


def check_token_budget(command: str, max_tokens: int, max_model_len: int) -> None:
    """Exit with code 2 when ``--max-tokens`` leaves no room for a prompt in ``max_model_len``."""
    if max_tokens >= max_model_len:
        usage_error(
            command,
            f"--max-tokens {max_tokens} must be smaller than --max-model-len {max_model_len} "
            "(the prompt needs room too)",
        )


def load_prompts_or_exit(command: str, source: str | None, num_prompts: int, seed: int) -> list:
    """:func:`rollouts.prompts.load_prompts`, exiting with code 2 on a bad prompt source."""
    from rollouts.prompts import load_prompts

    try:
        return load_prompts(source, num_prompts, seed)
    except ValueError as error:
        usage_error(command, f"argument --dataset: {error}")


def resolve_dtype_or_exit(command: str, dtype: str) -> str:
    """The engine dtype for ``--dtype`` on this machine (``auto``: by CPU flags), logged."""
    from das.vllm.engine import resolve_dtype

    try:
        return resolve_dtype(dtype)
    except ValueError as error:
        usage_error(command, f"argument --dtype: {error}")


def add_das_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--das-option KEY=VALUE`` (repeatable): a DAS config key for the DAS methods' ``what``."""
    parser.add_argument(
        "--das-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a DAS config key for the DAS methods' {what} (repeatable; VALUE is JSON, e.g. "
        "max_draft_batch=16, calibrate=false, or a bare string)",
    )


def parse_das_options(items: list[str]) -> tuple[tuple[str, Any], ...]:
    """``["key=value", ...]`` as (key, value) pairs; a value is read as JSON when it parses.

    Raises:
        ValueError: naming an item without ``=`` or with an empty key.
    """
    options = []
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--das-option {item!r} must be KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options.append((key.strip(), value))
    return tuple(options)
