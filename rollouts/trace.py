"""Rollout traces: one record per finished request, stored as parquet or jsonl.

A trace is what a recorded RL rollout phase leaves behind: for every step, every prompt and every
sample, the prompt tokens, the response tokens and why the response ended. The replay simulator,
the history store and the benchmarks all read traces through :func:`read_trace`.

Writes are atomic: the whole file is written to a temporary sibling and moved into place with
``os.replace``, so a crash in the middle of a write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rollouts.jsonl import read_jsonl_objects

FINISH_REASONS = ("stop", "length")
PARQUET_SUFFIX = ".parquet"
JSONL_SUFFIX = ".jsonl"

# Column name -> kind of value, in file order.
COLUMNS: dict[str, str] = {
    "prompt_key": "str",
    "step": "int",
    "sample_index": "int",
    "prompt_index": "int",
    "finish_reason": "str",
    "wall_s": "float",
    "prompt_tokens": "tokens",
    "response_tokens": "tokens",
}


def prompt_key_for(prompt_tokens: Sequence[int] | np.ndarray) -> str:
    """The default prompt key: a stable 16-hex-digit blake2b hash of the prompt token ids.

    The hash is taken over the little-endian int32 bytes of the ids, so it is the same in every
    process, on every machine and in every Python version (unlike ``hash()``).
    """
    tokens = np.ascontiguousarray(np.asarray(prompt_tokens, dtype="<i4"))
    return hashlib.blake2b(tokens.tobytes(), digest_size=8).hexdigest()


def _as_token_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of token ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} holds token ids outside the int32 range [0, 2**31)")
    tokens = array.astype(np.int32, copy=True)
    tokens.setflags(write=False)
    return tokens


@dataclass(frozen=True, eq=False)
class RolloutRecord:
    """One finished rollout: a response sampled for a prompt at an RL step.

    Attributes:
        prompt_key: groups rollouts of the same prompt across steps (see :func:`prompt_key_for`).
        step: the RL step (0-based) whose rollout phase produced this response.
        sample_index: which of the prompt's samples in this step (0-based).
        prompt_tokens: the prompt's token ids (int32, read-only).
        response_tokens: the generated token ids as the engine returned them (int32, read-only).
        finish_reason: ``"stop"`` (stop token) or ``"length"`` (hit the token cap).
        prompt_index: the prompt's position in the prompt set (e.g. the dataset row).
        wall_s: seconds from the request's first scheduling to its finish, or the step's elapsed
            time when the request finished if the engine gave no per-request timing.
    """

    prompt_key: str
    step: int
    sample_index: int
    prompt_tokens: np.ndarray
    response_tokens: np.ndarray
    finish_reason: str
    prompt_index: int
    wall_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_key, str) or not self.prompt_key:
            raise ValueError(f"prompt_key={self.prompt_key!r} must be a non-empty string")
        for name in ("step", "sample_index", "prompt_index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
            object.__setattr__(self, name, int(value))
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"finish_reason={self.finish_reason!r} must be one of {FINISH_REASONS}"
            )
        wall_s = self.wall_s
        if isinstance(wall_s, bool) or not isinstance(wall_s, (int, float, np.number)):
            raise ValueError(f"wall_s={wall_s!r} must be a number of seconds")
        if not math.isfinite(float(wall_s)) or wall_s < 0:
            raise ValueError(f"wall_s={wall_s!r} must be a finite, non-negative number")
        object.__setattr__(self, "wall_s", float(wall_s))
        object.__setattr__(
            self, "prompt_tokens", _as_token_array("prompt_tokens", self.prompt_tokens)
        )
        object.__setattr__(
            self, "response_tokens", _as_token_array("response_tokens", self.response_tokens)
        )

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return int(self.prompt_tokens.size)

    @property
    def num_response_tokens(self) -> int:
        """Number of generated tokens."""
        return int(self.response_tokens.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RolloutRecord):
            return NotImplemented
        return (
            self.prompt_key == other.prompt_key
            and self.step == other.step
            and self.sample_index == other.sample_index
            and self.finish_reason == other.finish_reason
            and self.prompt_index == other.prompt_index
            and self.wall_s == other.wall_s
            and np.array_equal(self.prompt_tokens, other.prompt_tokens)
            and np.array_equal(self.response_tokens, other.response_tokens)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays: not hashable


def group_by_step(records: Iterable[RolloutRecord]) -> dict[int, list[RolloutRecord]]:
    """Records grouped by RL step, steps in increasing order, each group in input order."""
    groups: dict[int, list[RolloutRecord]] = {}
    for record in records:
        groups.setdefault(record.step, []).append(record)
    return {step: groups[step] for step in sorted(groups)}


# --------------------------------------------------------------------------- writing


def _trace_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (PARQUET_SUFFIX, JSONL_SUFFIX):
        raise ValueError(f"trace file {path} must end in {PARQUET_SUFFIX} or {JSONL_SUFFIX}")
    return suffix


def _record_to_row(record: RolloutRecord) -> dict[str, Any]:
    return {
        "prompt_key": record.prompt_key,
        "step": record.step,
        "sample_index": record.sample_index,
        "prompt_index": record.prompt_index,
        "finish_reason": record.finish_reason,
        "wall_s": record.wall_s,
        "prompt_tokens": record.prompt_tokens.tolist(),
        "response_tokens": record.response_tokens.tolist(),
    }


def _arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("prompt_key", pa.string()),
            ("step", pa.int64()),
            ("sample_index", pa.int64()),
            ("prompt_index", pa.int64()),
            ("finish_reason", pa.string()),
            ("wall_s", pa.float64()),
            ("prompt_tokens", pa.list_(pa.int32())),
            ("response_tokens", pa.list_(pa.int32())),
        ]
    )


def _write_parquet(records: Sequence[RolloutRecord], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: [] for name in COLUMNS}
    for record in records:
        for name, value in _record_to_row(record).items():
            columns[name].append(value)
    table = pa.table(columns, schema=_arrow_schema())
    pq.write_table(table, path, compression="zstd")


def _write_jsonl(records: Sequence[RolloutRecord], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(_record_to_row(record), separators=(",", ":")))
            handle.write("\n")


def write_trace(records: Iterable[RolloutRecord], path: str | os.PathLike[str]) -> Path:
    """Write ``records`` to ``path`` (parquet or jsonl, by suffix), replacing it atomically.

    The file is written to a temporary file in the same folder, flushed to disk and moved into
    place with ``os.replace``: readers see either the old file or the complete new one.
    Returns the path written. Raises ``ValueError`` for an empty ``records`` (an empty trace is
    never valid) or a suffix other than ``.parquet``/``.jsonl``.
    """
    path = Path(path)
    suffix = _trace_format(path)
    records = list(records)
    if not records:
        raise ValueError(f"refusing to write an empty trace to {path}: no rollout records")
    for record in records:
        if not isinstance(record, RolloutRecord):
            raise ValueError(f"write_trace({path}) got {type(record).__name__}, not RolloutRecord")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        os.chmod(temp_path, 0o644)  # mkstemp's 0600 would make traces private to their writer
        if suffix == PARQUET_SUFFIX:
            _write_parquet(records, temp_path)
        else:
            _write_jsonl(records, temp_path)
        with open(temp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)
    return path


def append_step(path: str | os.PathLike[str], records: Iterable[RolloutRecord]) -> Path:
    """Add one finished step's records to the trace at ``path`` (created if missing), atomically.

    The existing records are read, the new ones added and the whole trace rewritten through
    :func:`write_trace`, so a failure at any point leaves the earlier steps on disk untouched.
    Raises ``ValueError`` if a step being added is already in the file (a re-run appending twice).
    """
    path = Path(path)
    records = list(records)
    existing = read_trace(path) if path.exists() else []
    existing_steps = {record.step for record in existing}
    repeated = sorted(existing_steps & {record.step for record in records})
    if repeated:
        raise ValueError(f"trace file {path} already holds step(s) {repeated}; refusing to append")
    return write_trace([*existing, *records], path)


# --------------------------------------------------------------------------- reading


def _check_value(path: Path, where: str, name: str, kind: str, value: Any) -> None:
    """Raise ValueError naming the file, the place and the column if ``value`` is not ``kind``."""
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, list) and all(
            isinstance(token, int) and not isinstance(token, bool) for token in value
        )
    if not ok:
        expected = {"str": "a string", "int": "an integer", "float": "a number"}.get(
            kind, "a list of integer token ids"
        )
        raise ValueError(
            f"trace file {path}: {where} column {name!r} must be {expected}, "
            f"got {type(value).__name__}"
        )


def _rows_to_records(path: Path, rows: Iterable[tuple[str, dict[str, Any]]]) -> list[RolloutRecord]:
    records = []
    for where, row in rows:
        for name, kind in COLUMNS.items():
            _check_value(path, where, name, kind, row[name])
        try:
            records.append(RolloutRecord(**{name: row[name] for name in COLUMNS}))
        except ValueError as error:
            raise ValueError(f"trace file {path}: {where}: {error}") from error
    return records


def _missing_columns_error(path: Path, present: Iterable[str]) -> ValueError | None:
    missing = [name for name in COLUMNS if name not in set(present)]
    if not missing:
        return None
    return ValueError(f"trace file {path} is missing column(s) {', '.join(missing)}")


def _read_parquet(path: Path) -> list[RolloutRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"trace file {path} is not a readable parquet file: {error}") from error
    error = _missing_columns_error(path, table.column_names)
    if error is not None:
        raise error
    expected_types = {
        "str": pa.types.is_string,
        "int": pa.types.is_integer,
        "float": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
        "tokens": lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
    }
    for name, kind in COLUMNS.items():
        column_type = table.schema.field(name).type
        if not expected_types[kind](column_type):
            raise ValueError(
                f"trace file {path}: column {name!r} has type {column_type}, expected {kind}"
            )
    columns = {name: table.column(name).to_pylist() for name in COLUMNS}
    rows = (
        (f"row {index}", {name: columns[name][index] for name in COLUMNS})
        for index in range(table.num_rows)
    )
    return _rows_to_records(path, rows)


def _read_jsonl(path: Path) -> list[RolloutRecord]:
    rows = []
    for line_number, row in read_jsonl_objects(path, "trace file"):
        error = _missing_columns_error(path, row)
        if error is not None:
            raise ValueError(f"{error} (line {line_number})")
        rows.append((f"line {line_number}", row))
    return _rows_to_records(path, rows)


def read_trace(path: str | os.PathLike[str]) -> list[RolloutRecord]:
    """Read a trace written by :func:`write_trace` / :func:`append_step` (parquet or jsonl).

    Raises ``ValueError`` naming the file and the problem when the file is missing, corrupt or
    truncated, lacks columns (named), holds values of the wrong type, or has no records.
    """
    path = Path(path)
    suffix = _trace_format(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    records = _read_parquet(path) if suffix == PARQUET_SUFFIX else _read_jsonl(path)
    if not records:
        raise ValueError(f"trace file {path} is empty: it holds no rollout records")
    return records
