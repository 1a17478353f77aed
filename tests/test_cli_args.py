"""Bad arguments of ``record``, ``run`` and ``demo``: exit code 2 and a message naming the value,
before any prompt source is read or any engine starts."""

from __future__ import annotations

from pathlib import Path

import pytest

import das.bench.live
import das.cli.run
import das.vllm.engine
from das.cli import main


class EngineStarted(Exception):
    """Raised by the guards below: a command got past its checks to the engine."""


@pytest.fixture(autouse=True)
def no_engine(monkeypatch, tmp_path: Path) -> None:
    """Any engine start fails the test; the cache and the prompt file are local to the test."""

    def refuse(*args, **kwargs):
        raise EngineStarted

    monkeypatch.setattr(das.vllm.engine, "make_llm", refuse)
    monkeypatch.setattr(das.bench.live, "run_comparison", refuse)
    monkeypatch.setattr(das.cli.run, "unwind_on_sigterm", lambda: None)  # keep pytest's handler
    monkeypatch.setattr(das.vllm.engine, "_cuda_available", lambda: False)
    monkeypatch.setenv("DAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DAS_GSM8K_PATH", raising=False)


def exit_message(argv: list[str], capsys) -> str:
    """Run ``das-rollout ARGV``, assert it exits with code 2, return its stderr."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2, f"exit code {raised.value.code!r} for {argv}"
    return capsys.readouterr().err


BAD_COUNTS = [
    ("--num-prompts", "0", "must be a positive integer"),
    ("--num-prompts", "-3", "must be a positive integer"),
    ("--samples", "0", "must be a positive integer"),
    ("--steps", "-1", "must be a positive integer"),
    ("--max-tokens", "0", "must be a positive integer"),
    ("--steps", "two", "must be a positive integer"),
    ("--temperature", "-0.5", "must be a number >= 0"),
    ("--temperature", "nan", "must be a number >= 0"),
]


@pytest.mark.parametrize("command", ["record", "run", "demo"])
@pytest.mark.parametrize(("option", "value", "requirement"), BAD_COUNTS)
def test_bad_numbers_name_option_and_value(command, option, value, requirement, capsys) -> None:
    message = exit_message([command, option, value], capsys)
    assert f"argument {option}: '{value}' {requirement}" in message


@pytest.mark.parametrize("command", ["record", "run"])
@pytest.mark.parametrize(
    ("option", "value", "requirement"),
    [
        ("--top-p", "0", "must be a number in (0, 1]"),
        ("--top-p", "1.5", "must be a number in (0, 1]"),
        ("--kv-cache-gib", "0", "must be a number > 0"),
        ("--max-model-len", "-5", "must be a positive integer"),
    ],
)
def test_bad_engine_settings_name_the_value(command, option, value, requirement, capsys) -> None:
    message = exit_message([command, option, value], capsys)
    assert f"argument {option}: '{value}' {requirement}" in message


@pytest.mark.parametrize("command", ["record", "run", "demo"])
def test_unknown_dtype_is_rejected(command, capsys) -> None:
    message = exit_message([command, "--dtype", "fp8"], capsys)
    assert "argument --dtype: invalid choice: 'fp8'" in message


@pytest.mark.parametrize("command", ["record", "run", "demo"])
def test_missing_dataset_file_is_named(command, tmp_path: Path, capsys) -> None:
    path = tmp_path / "absent.jsonl"
    message = exit_message([command, "--dataset", str(path)], capsys)
    assert f"argument --dataset: prompt file {path} does not exist" in message


@pytest.mark.parametrize("command", ["record", "run", "demo"])
def test_gsm8k_variable_naming_no_file_is_named(command, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DAS_GSM8K_PATH", str(tmp_path / "train.jsonl"))
    message = exit_message([command], capsys)
    assert f"DAS_GSM8K_PATH='{tmp_path / 'train.jsonl'}' is not a file" in message


@pytest.mark.parametrize("command", ["record", "run"])
def test_missing_model_folder_is_named(command, tmp_path: Path, capsys) -> None:
    path = tmp_path / "no-model"
    message = exit_message([command, "--model", str(path), "--dataset", "builtin"], capsys)
    assert f"argument --model: model folder {path} does not exist" in message


@pytest.mark.parametrize("command", ["record", "run"])
def test_max_tokens_must_leave_room_for_the_prompt(command, capsys) -> None:
    argv = [command, "--max-tokens", "2048", "--max-model-len", "2048"]
    message = exit_message(argv, capsys)
    assert "--max-tokens 2048 must be smaller than --max-model-len 2048" in message


def test_record_refuses_to_overwrite_a_trace(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "trace.parquet"
    trace.write_bytes(b"")
    message = exit_message(["record", "--output", str(trace), "--dataset", "builtin"], capsys)
    assert f"trace file '{trace}' exists; pass --overwrite" in message


def test_run_names_an_unknown_method(capsys) -> None:
    message = exit_message(["run", "--methods", "none,das_polcy"], capsys)
    assert "unknown method(s) ['das_polcy']" in message


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--k", "0"], "argument --k: '0' must be a positive integer"),
        (["--probe-prompts", "-1"], "argument --probe-prompts: '-1' must be a non-negative"),
        (["--das-option", "calibrate"], "--das-option 'calibrate' must be KEY=VALUE"),
        (["--das-option", "no_such_key=1"], "no_such_key"),
    ],
)
def test_run_names_bad_speculation_settings(argv, expected, capsys) -> None:
    assert expected in exit_message(["run", *argv], capsys)


def test_demo_output_dir_must_be_a_folder(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    message = exit_message(["demo", "--output-dir", str(path)], capsys)
    assert f"argument --output-dir: '{path}' exists and is not a folder" in message


def test_replay_names_a_missing_trace(tmp_path: Path, capsys) -> None:
    path = tmp_path / "absent.parquet"
    with pytest.raises(SystemExit, match=rf"trace file {path} does not exist"):
        main(["replay", str(path)])


@pytest.mark.parametrize(
    "argv",
    [
        ["record", "--dataset", "builtin", "--num-prompts", "2", "--dtype", "float32"],
        ["run", "--dataset", "builtin", "--num-prompts", "2", "--methods", "none,das_policy"],
        ["demo", "--dataset", "builtin", "--num-prompts", "2", "--steps", "1"],
    ],
)
def test_good_arguments_reach_the_engine(argv: list[str]) -> None:
    # The guard is what stops these: the checks above reject only bad values.
    with pytest.raises(EngineStarted):
        main(argv)
