"""Reading JSON-lines files with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl_objects(path: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for every non-blank line of ``path``.

    ``kind`` names the file in errors ("trace file", "prompt file"). Raises ``ValueError`` if the
    file cannot be read, a line is not valid JSON (a corrupt or truncated file), or a line is
    not a JSON object.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{kind} {path} is not a readable jsonl file: {error}") from error
    objects = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{kind} {path}: line {line_number} is not valid JSON (corrupt or truncated "
                f"file): {error}"
            ) from error
        if not isinstance(row, dict):
            raise ValueError(f"{kind} {path}: line {line_number} is not a JSON object")
        objects.append((line_number, row))
    return objects
