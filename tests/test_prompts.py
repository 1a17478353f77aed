"""Prompt sources: GSM8K on disk, local files, the built-in generator, and their errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollouts.prompts import (
    Prompt,
    builtin_prompts,
    default_gsm8k_path,
    final_answer,
    format_gsm8k_messages,
    load_prompts,
)

GSM8K_PATH = default_gsm8k_path()  # conftest.py points it at ../shared when that file exists
needs_gsm8k = pytest.mark.skipif(
    GSM8K_PATH is None or not GSM8K_PATH.is_file(), reason=f"DAS_GSM8K_PATH={GSM8K_PATH} is absent"
)


@needs_gsm8k
def test_gsm8k_loads_the_first_rows_of_the_shared_file() -> None:
    prompts = load_prompts(None, 5, seed=0)
    with open(GSM8K_PATH, encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(5)]
    assert [prompt.index for prompt in prompts] == [0, 1, 2, 3, 4]
    assert [prompt.text for prompt in prompts] == [row["question"] for row in rows]
    assert prompts[0].text.startswith("Natalia sold clips to 48 of her friends")
    assert prompts[0].answer == "72"  # the text after "####" in GSM8K's solution
    assert load_prompts("gsm8k", 5, seed=123) == prompts, "seed must not change file prompts"
    assert load_prompts(str(GSM8K_PATH), 3, seed=0) == prompts[:3]


def test_gsm8k_path_honours_the_environment(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    monkeypatch.setenv("DAS_GSM8K_PATH", str(path))
    assert load_prompts(None, 4, seed=0) == [Prompt(index=0, text="What is 1+1?", answer="2")]


def test_gsm8k_path_set_but_absent_is_an_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "absent.jsonl"
    monkeypatch.setenv("DAS_GSM8K_PATH", str(path))
    with pytest.raises(ValueError, match=rf"DAS_GSM8K_PATH='{path}' is not a file"):
        load_prompts("gsm8k", 2, seed=0)


def test_gsm8k_without_the_variable_never_reads_a_sibling_folder(monkeypatch) -> None:
    # Unset: the hub is tried (here: unreachable), never a path guessed next to the repository.
    import rollouts.prompts as prompts_module

    monkeypatch.delenv("DAS_GSM8K_PATH", raising=False)
    monkeypatch.setattr(prompts_module, "hub_reachable", lambda: False)
    assert default_gsm8k_path() is None
    assert load_prompts(None, 3, seed=4) == builtin_prompts(3, seed=4)


def test_offline_machine_skips_the_hub_without_calling_datasets(monkeypatch, caplog) -> None:
    import datasets

    import rollouts.prompts as prompts_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("load_dataset called although the hub is unreachable")

    monkeypatch.delenv("DAS_GSM8K_PATH", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    monkeypatch.setattr(prompts_module, "HUB_HOST", "das-no-such-host.invalid")
    with caplog.at_level(logging.WARNING, logger="rollouts.prompts"):
        prompts = load_prompts("gsm8k", 2, seed=5)
    assert prompts == builtin_prompts(2, seed=5)
    assert "das-no-such-host.invalid is unreachable" in caplog.text


def test_builtin_generator_is_deterministic() -> None:
    first = builtin_prompts(20, seed=7)
    assert first == builtin_prompts(20, seed=7)
    assert builtin_prompts(5, seed=7) == first[:5], "fewer prompts must be a prefix"
    assert builtin_prompts(20, seed=8) != first
    assert [prompt.index for prompt in first] == list(range(20))
    assert len({prompt.text for prompt in first}) > 15
    assert load_prompts("builtin", 20, seed=7) == first


def test_builtin_answers_are_correct_for_a_known_seed() -> None:
    # Each template's answer is recomputed here from the numbers in its text.
    import re

    for prompt in builtin_prompts(40, seed=3):
        numbers = [int(n) for n in re.findall(r"\d+", prompt.text)]
        if "buys" in prompt.text and "bags" in prompt.text:
            expected = numbers[0] + numbers[1] * numbers[2]
        elif "every day" in prompt.text:
            expected = numbers[0] * numbers[1] - numbers[2]
        elif "equally among" in prompt.text:
            expected = numbers[0] // numbers[1]
        else:
            price, count, paid = numbers
            expected = paid - price * count
        assert prompt.answer == str(expected), prompt.text


def test_unreachable_hub_dataset_falls_back_to_builtin(monkeypatch, caplog) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("rollouts.prompts.hub_reachable", lambda: True)
    with caplog.at_level(logging.WARNING, logger="rollouts.prompts"):
        prompts = load_prompts("openai/gsm8k", 6, seed=1)
    assert prompts == builtin_prompts(6, seed=1)
    assert "could not load hub dataset openai/gsm8k" in caplog.text


@pytest.mark.parametrize("column", ["question", "prompt", "text"])
def test_local_jsonl_takes_the_first_text_column(tmp_path: Path, column: str) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{column: f"question {i}", "other": i} for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = load_prompts(str(path), 3, seed=0)
    assert prompts == [Prompt(index=i, text=f"question {i}", answer=None) for i in range(3)]


def test_local_parquet_prefers_question_over_prompt(tmp_path: Path) -> None:
    path = tmp_path / "prompts.parquet"
    table = pa.table(
        {"prompt": ["p0", "p1"], "question": ["q0", "q1"], "answer": ["x #### 1,000", "#### 5"]}
    )
    pq.write_table(table, path)
    prompts = load_prompts(str(path), 10, seed=0)
    assert prompts == [Prompt(0, "q0", "1000"), Prompt(1, "q1", "5")]


def test_file_without_a_text_column_names_file_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input": "x", "label": 1}) + "\n")
    with pytest.raises(ValueError, match=rf"{path} has no text column.*\['input', 'label'\]"):
        load_prompts(str(path), 1, seed=0)


def test_empty_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=rf"{path} is empty"):
        load_prompts(str(path), 1, seed=0)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(ValueError, match=rf"{path} does not exist"):
        load_prompts(str(path), 1, seed=0)


def test_corrupt_files_are_errors_naming_them(tmp_path: Path) -> None:
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"question": "a"}\n{"question": \n')
    with pytest.raises(ValueError, match=rf"{jsonl}: line 2 is not valid JSON"):
        load_prompts(str(jsonl), 2, seed=0)
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match=rf"{parquet} is not a readable parquet file"):
        load_prompts(str(parquet), 2, seed=0)


def test_blank_question_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"question": "  "}) + "\n")
    with pytest.raises(ValueError, match="row 0 column 'question'"):
        load_prompts(str(path), 1, seed=0)


@pytest.mark.parametrize("num_prompts", [0, -3])
def test_non_positive_num_prompts_is_rejected(num_prompts: int) -> None:
    with pytest.raises(ValueError, match=f"num_prompts={num_prompts}"):
        load_prompts("builtin", num_prompts, seed=0)


def test_short_source_returns_what_it_has(tmp_path: Path, caplog) -> None:
    path = tmp_path / "two.jsonl"
    path.write_text('{"question": "a"}\n{"question": "b"}\n')
    with caplog.at_level(logging.WARNING, logger="rollouts.prompts"):
        prompts = load_prompts(str(path), 5, seed=0)
    assert [prompt.text for prompt in prompts] == ["a", "b"]
    assert "has only 2 prompts (5 asked)" in caplog.text


def test_gsm8k_messages_ask_for_the_answer_format() -> None:
    messages = format_gsm8k_messages("  How many? ")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"].startswith("How many?\n")
    assert "step by step" in messages[0]["content"]
    assert "#### <answer>" in messages[0]["content"]


def test_final_answer_extracts_text_after_the_marker() -> None:
    assert final_answer("a\nb #### 1,234 ") == "1234"
    assert final_answer("18") == "18"
    assert final_answer(None) is None
