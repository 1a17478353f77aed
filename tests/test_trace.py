"""Rollout trace format: round trips, atomic appends, and errors that name the file and column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rollouts.trace as trace_module
from rollouts.trace import (
    RolloutRecord,
    append_step,
    group_by_step,
    prompt_key_for,
    read_trace,
    write_trace,
)

FORMATS = [".parquet", ".jsonl"]


def make_record(step: int = 0, sample_index: int = 0, prompt_index: int = 0, **overrides):
    prompt_tokens = np.array([1, 2, 3, prompt_index + 10], dtype=np.int32)
    fields = {
        "prompt_key": prompt_key_for(prompt_tokens),
        "step": step,
        "sample_index": sample_index,
        "prompt_tokens": prompt_tokens,
        # Lengths vary with the sample so a reordering or mix-up would show.
        "response_tokens": np.arange(5 + 3 * sample_index + step, dtype=np.int32) + 100,
        "finish_reason": "length" if sample_index % 2 else "stop",
        "prompt_index": prompt_index,
        "wall_s": 0.25 * (sample_index + 1) + step,
    }
    fields.update(overrides)
    return RolloutRecord(**fields)


def make_step(step: int, num_prompts: int = 3, num_samples: int = 2) -> list[RolloutRecord]:
    return [
        make_record(step=step, sample_index=sample, prompt_index=prompt)
        for prompt in range(num_prompts)
        for sample in range(num_samples)
    ]


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_keeps_every_field(tmp_path: Path, suffix: str) -> None:
    records = make_step(0) + make_step(1)
    records.append(make_record(step=2, response_tokens=np.array([], dtype=np.int32)))
    path = write_trace(records, tmp_path / f"trace{suffix}")
    loaded = read_trace(path)
    assert loaded == records
    assert all(record.prompt_tokens.dtype == np.int32 for record in loaded)
    assert all(record.response_tokens.dtype == np.int32 for record in loaded)
    assert loaded[-1].num_response_tokens == 0
    assert loaded[0].num_prompt_tokens == 4


def test_record_arrays_are_read_only_copies() -> None:
    tokens = np.array([7, 8, 9], dtype=np.int64)
    record = make_record(response_tokens=tokens)
    tokens[0] = 0
    assert record.response_tokens.tolist() == [7, 8, 9]
    assert record.response_tokens.dtype == np.int32
    with pytest.raises(ValueError):
        record.response_tokens[0] = 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("finish_reason", "abort", "finish_reason='abort'"),
        ("step", -1, "step=-1"),
        ("sample_index", 1.5, "sample_index=1.5"),
        ("wall_s", float("nan"), "wall_s=nan"),
        ("prompt_key", "", "prompt_key=''"),
        ("response_tokens", np.array([[1, 2]]), "response_tokens must be a 1-D"),
        ("prompt_tokens", np.array([0.5, 1.0]), "prompt_tokens must hold integer"),
    ],
)
def test_record_validates_fields(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        make_record(**{field: value})


@pytest.mark.parametrize("suffix", FORMATS)
def test_append_step_accumulates_steps(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"trace{suffix}"
    for step in range(3):
        append_step(path, make_step(step))
    loaded = read_trace(path)
    assert sorted(group_by_step(loaded)) == [0, 1, 2]
    assert loaded == make_step(0) + make_step(1) + make_step(2)


@pytest.mark.parametrize("suffix", FORMATS)
def test_append_step_refuses_a_step_already_present(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"trace{suffix}"
    append_step(path, make_step(0))
    with pytest.raises(ValueError, match=r"already holds step\(s\) \[0\]"):
        append_step(path, make_step(0))
    assert read_trace(path) == make_step(0)


@pytest.mark.parametrize("suffix", FORMATS)
def test_failed_append_keeps_earlier_steps(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"trace{suffix}"
    append_step(path, make_step(0))
    append_step(path, make_step(1))
    before = path.read_bytes()

    def crash_mid_write(records, temp_path):
        Path(temp_path).write_bytes(b"half a file")  # a partial write, then the crash
        raise OSError("disk full")

    writer = "_write_parquet" if suffix == ".parquet" else "_write_jsonl"
    monkeypatch.setattr(trace_module, writer, crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        append_step(path, make_step(2))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert read_trace(path) == make_step(0) + make_step(1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary file left behind"


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_file_raises_naming_it(tmp_path: Path, suffix: str) -> None:
    path = write_trace(make_step(0), tmp_path / f"trace{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(path)):
        read_trace(path)


def test_corrupt_parquet_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "trace.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(ValueError, match=rf"{path}.*not a readable parquet"):
        read_trace(path)


def test_corrupt_jsonl_line_raises_naming_file_and_line(tmp_path: Path) -> None:
    path = write_trace(make_step(0), tmp_path / "trace.jsonl")
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-7]  # cut the end off the third record
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: line 3 is not valid JSON"):
        read_trace(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent.parquet"
    with pytest.raises(ValueError, match=rf"{path} does not exist"):
        read_trace(path)


def test_unknown_suffix_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.parquet or \.jsonl"):
        write_trace(make_step(0), tmp_path / "trace.csv")


@pytest.mark.parametrize("suffix", FORMATS)
def test_empty_trace_raises(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"trace{suffix}"
    with pytest.raises(ValueError, match="empty trace"):
        write_trace([], path)
    if suffix == ".jsonl":
        path.write_text("")
    else:
        pq.write_table(trace_module._arrow_schema().empty_table(), path)
    with pytest.raises(ValueError, match=rf"{path} is empty"):
        read_trace(path)


def test_parquet_missing_columns_are_named(tmp_path: Path) -> None:
    path = write_trace(make_step(0), tmp_path / "trace.parquet")
    table = pq.read_table(path).drop_columns(["response_tokens", "wall_s"])
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=rf"{path} is missing column\(s\) wall_s, response_tokens"):
        read_trace(path)


def test_jsonl_missing_column_is_named(tmp_path: Path) -> None:
    path = write_trace(make_step(0), tmp_path / "trace.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[1]["finish_reason"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"missing column\(s\) finish_reason \(line 2\)"):
        read_trace(path)


def test_parquet_wrong_column_type_is_named(tmp_path: Path) -> None:
    path = write_trace(make_step(0), tmp_path / "trace.parquet")
    table = pq.read_table(path)
    index = table.column_names.index("step")
    steps_as_text = pa.array([str(step) for step in table.column("step").to_pylist()])
    pq.write_table(table.set_column(index, "step", steps_as_text), path)
    with pytest.raises(ValueError, match=rf"{path}: column 'step' has type string"):
        read_trace(path)


def test_jsonl_wrong_value_type_is_named(tmp_path: Path) -> None:
    path = write_trace(make_step(0), tmp_path / "trace.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["response_tokens"] = "1 2 3"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"line 1 column 'response_tokens' must be a list"):
        read_trace(path)


def test_jsonl_invalid_value_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write_trace(make_step(0), tmp_path / "trace.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4]["finish_reason"] = "abort"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"line 5: finish_reason='abort'"):
        read_trace(path)


def test_prompt_key_is_stable_and_discriminating() -> None:
    tokens = [1, 9690, 198, 2683, 359]
    key = prompt_key_for(tokens)
    # A fixed value: the key must not change between processes, machines or releases.
    assert key == prompt_key_for(np.array(tokens, dtype=np.int64))
    assert key == prompt_key_for(tuple(tokens))
    assert len(key) == 16 and int(key, 16) >= 0
    # blake2b(digest_size=8) of the little-endian int32 bytes, pinned: a change breaks traces.
    assert key == "0d5a1177136fc5ba"
    assert prompt_key_for([*tokens, 2]) != key
    assert prompt_key_for(tokens[::-1]) != key
    assert prompt_key_for([]) != key


def test_group_by_step_orders_steps_and_keeps_record_order() -> None:
    records = make_step(2) + make_step(0) + make_step(1)[:1]
    groups = group_by_step(records)
    assert list(groups) == [0, 1, 2]
    assert groups[2] == make_step(2)
    assert groups[1] == make_step(1)[:1]
