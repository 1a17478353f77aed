"""Reading multi-sample generation files (prompt text + sampled responses) without tokenizing.

Three line formats are understood, one JSON object per line, plain or gzip-compressed:

``qwen_math`` (the Qwen2.5-Math evaluation output)
    ``question``: the prompt text; ``code``: a list of the model's output strings. Other fields
    (``pred``, ``score``, ``gt``, ``idx``, ...) are ignored.
``codet`` (CodeT's generated-solution files)
    ``prompt``: the prompt text; ``samples``: the completions, either a JSON list of strings or
    a string holding a Python-literal list of strings (parsed with ``ast.literal_eval``).
``generic``
    ``prompt``: the prompt text; ``response`` (one string) or ``responses`` (a list of strings);
    optional ``step`` or ``checkpoint`` (a non-negative integer: which policy step wrote the
    line, when one file holds several steps); optional ``finish_reason`` (``"stop"`` or
    ``"length"``, or a list of them, one per response; default ``"stop"``).

Every error names the file, the line and the field: ``gen.jsonl:17: field 'responses' must be a
list of strings, got int``.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollouts.trace import FINISH_REASONS

FORMATS = ("qwen_math", "codet", "generic")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class TextSample:
    """One response of a generation file, still as text.

    Attributes:
        prompt: the prompt text.
        response: the generated text.
        finish_reason: ``"stop"`` or ``"length"``.
        step_label: the line's ``step``/``checkpoint`` value (generic format), else ``None``.
        line_number: the 1-based line of the file the sample came from.
    """

    prompt: str
    response: str
    finish_reason: str
    step_label: int | None
    line_number: int


@dataclass(frozen=True)
class GenerationFile:
    """The samples of one generation file, in file order, and the format they were read as."""

    path: Path
    format: str
    samples: tuple[TextSample, ...]


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes (whatever its name)."""
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for each non-blank line; gzip is recognised by its magic bytes.

    Raises ``ValueError`` naming ``file:line`` for unreadable files, lines that are not JSON and
    lines that are not JSON objects.
    """
    try:
        opener = gzip.open if is_gzip(path) else open
    except OSError as error:
        raise ValueError(f"{path}: cannot read generation file: {error}") from error
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
        line_number = 0
        try:
            for line_number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON: {error}") from error
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}:{line_number}: must be a JSON object, got {type(row).__name__}"
                    )
                yield line_number, row
        except (OSError, EOFError, UnicodeDecodeError) as error:
            # gzip.BadGzipFile is an OSError; a truncated gzip stream raises EOFError.
            raise ValueError(
                f"{path}:{line_number + 1}: cannot read generation file: {error}"
            ) from error


def detect_format(row: dict[str, Any]) -> str | None:
    """The format whose required fields ``row`` has, or ``None`` if none matches."""
    if "question" in row and "code" in row:
        return "qwen_math"
    if "prompt" in row and "samples" in row:
        return "codet"
    if "prompt" in row and ("response" in row or "responses" in row):
        return "generic"
    return None


def _field_error(where: str, field: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{where}: field {field!r} must be {expected}, got {type(value).__name__}")


def _require(row: dict[str, Any], where: str, field: str) -> Any:
    if field not in row:
        present = ", ".join(sorted(row)) or "none"
        raise ValueError(f"{where}: field {field!r} is missing (fields present: {present})")
    return row[field]


def _string(row: dict[str, Any], where: str, field: str) -> str:
    value = _require(row, where, field)
    if not isinstance(value, str):
        raise _field_error(where, field, "a string", value)
    return value


def _string_list(where: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _field_error(where, field, "a list of strings", value)
    for position, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(
                f"{where}: field {field!r} must be a list of strings, "
                f"item {position} is {type(item).__name__}"
            )
    if not value:
        raise ValueError(f"{where}: field {field!r} must hold at least one string, got []")
    return value


def _parse_qwen_math(row: dict[str, Any], where: str) -> tuple[str, list[str]]:
    prompt = _string(row, where, "question")
    return prompt, _string_list(where, "code", _require(row, where, "code"))


def _parse_codet(row: dict[str, Any], where: str) -> tuple[str, list[str]]:
    prompt = _string(row, where, "prompt")
    samples = _require(row, where, "samples")
    if isinstance(samples, str):
        # A Python-literal list: literal_eval only builds literals, it never runs code.
        try:
            samples = ast.literal_eval(samples)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
            raise ValueError(
                f"{where}: field 'samples' must be a Python-literal list of strings: {error}"
            ) from error
    return prompt, _string_list(where, "samples", samples)


def _step_label(row: dict[str, Any], where: str) -> int | None:
    if "step" in row and "checkpoint" in row:
        raise ValueError(f"{where}: fields 'step' and 'checkpoint' must not both be given")
    for field in ("step", "checkpoint"):
        if field in row:
            value = row[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{where}: field {field!r} must be a non-negative integer, got {value!r}"
                )
            return value
    return None


def _finish_reasons(row: dict[str, Any], where: str, num_responses: int) -> list[str]:
    if "finish_reason" not in row:
        return ["stop"] * num_responses
    value = row["finish_reason"]
    reasons = value if isinstance(value, list) else [value] * num_responses
    if len(reasons) != num_responses:
        raise ValueError(
            f"{where}: field 'finish_reason' holds {len(reasons)} reasons for "
            f"{num_responses} responses"
        )
    for reason in reasons:
        if reason not in FINISH_REASONS:
            raise ValueError(
                f"{where}: field 'finish_reason' must be one of {FINISH_REASONS}, got {reason!r}"
            )
    return reasons


def _parse_generic(row: dict[str, Any], where: str) -> tuple[str, list[str]]:
    prompt = _string(row, where, "prompt")
    if "response" in row and "responses" in row:
        raise ValueError(f"{where}: fields 'response' and 'responses' must not both be given")
    if "response" in row:
        return prompt, [_string(row, where, "response")]
    return prompt, _string_list(where, "responses", _require(row, where, "responses"))


_PARSERS = {"qwen_math": _parse_qwen_math, "codet": _parse_codet, "generic": _parse_generic}


def read_generation_file(path: str | os.PathLike[str], file_format: str = "auto") -> GenerationFile:
    """Read every sample of a generation file as text (see the module docstring for formats).

    ``file_format`` is one of :data:`FORMATS`, or ``"auto"`` to detect it from the fields of the
    first line. Raises ``ValueError`` naming ``file:line`` and the field for any malformed line,
    an unknown format or an empty file.
    """
    path = Path(path)
    if file_format != "auto" and file_format not in FORMATS:
        raise ValueError(f"file_format={file_format!r} must be 'auto' or one of {FORMATS}")
    if not path.is_file():
        raise ValueError(f"{path}: generation file does not exist")
    samples: list[TextSample] = []
    for line_number, row in iter_json_lines(path):
        where = f"{path}:{line_number}"
        if file_format == "auto":
            file_format = detect_format(row) or ""
            if not file_format:
                fields = ", ".join(sorted(row)) or "none"
                raise ValueError(
                    f"{where}: cannot tell the format from fields ({fields}); expected "
                    "question+code (qwen_math), prompt+samples (codet) or "
                    "prompt+response(s) (generic); pass --format"
                )
        prompt, responses = _PARSERS[file_format](row, where)
        if file_format == "generic":
            step_label = _step_label(row, where)
            reasons = _finish_reasons(row, where, len(responses))
        else:
            step_label, reasons = None, ["stop"] * len(responses)
        samples.extend(
            TextSample(prompt, response, reason, step_label, line_number)
            for response, reason in zip(responses, reasons, strict=True)
        )
    if not samples:
        raise ValueError(f"{path}: generation file holds no samples")
    return GenerationFile(path=path, format=file_format, samples=tuple(samples))
