"""``das-rollout import``: generation files (three formats, plain or gzip) into traces."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from rollouts.import_formats import read_generation_file
from rollouts.importers import (
    assign_steps,
    prompt_key_for_text,
    summarize_import,
    tokenize_samples,
)
from rollouts.trace import read_trace

DATA = Path(__file__).parent / "data" / "import"
QWEN_10 = DATA / "qwen_math_ckpt10.jsonl"
QWEN_20 = DATA / "qwen_math_ckpt20.jsonl"
CODET = DATA / "codet_samples.jsonl"
GENERIC = DATA / "generic_steps.jsonl"


class CharTokenizer:
    """One token per character (its code point); the chat template wraps the text in [u]...[/u].

    Prompts get a leading 1 as a stand-in for a BOS token, to see where special tokens go.
    """

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(char) for char in text]

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.encode(text, add_special_tokens) for text in texts]}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True) -> str:
        assert not tokenize
        return "".join(f"[u]{m['content']}[/u]" for m in messages)


def as_text(tokens: np.ndarray) -> str:
    return "".join(chr(token) for token in tokens)


def import_records(files, **kwargs):
    tokenizer_options = {"chat_template": kwargs.pop("chat_template", False)}
    assigned, sources = assign_steps([read_generation_file(f) for f in files], **kwargs)
    return tokenize_samples(assigned, CharTokenizer(), **tokenizer_options), sources


def test_qwen_math_files_become_one_step_each_with_keys_shared_across_files():
    records, sources = import_records([QWEN_10, QWEN_20])
    # ckpt10: 1 + 2 outputs; ckpt20: 1 + 1 + 1 (a blank line in between is skipped)
    assert [r.step for r in records] == [0, 0, 0, 1, 1, 1]
    assert [s.files for s in sources] == [(str(QWEN_10),), (str(QWEN_20),)]
    assert [as_text(r.response_tokens) for r in records] == [
        "one plus one is 2",
        "two times three is 6",
        "it is 6",
        "the product is 6",
        "the sum is 2",
        "nine minus four is 5",
    ]
    one_plus_one = prompt_key_for_text("What is 1 + 1?")
    keys = [r.prompt_key for r in records]
    assert keys[0] == keys[4] == one_plus_one  # same prompt text, different files and lines
    assert keys[1] == keys[2] == keys[3] != one_plus_one
    # prompt_index: first appearance over all files; sample_index counts within a step
    assert [r.prompt_index for r in records] == [0, 1, 1, 1, 0, 2]
    assert [r.sample_index for r in records] == [0, 0, 1, 0, 0, 0]
    assert all(r.finish_reason == "stop" for r in records)
    # plain-text prompt with the tokenizer's special tokens; response without them
    assert records[0].prompt_tokens.tolist() == [1, *map(ord, "What is 1 + 1?")]
    assert records[0].response_tokens[0] == ord("o")


def test_prompt_key_is_a_fixed_value_of_the_text():
    # A fixed value: keys must not change between processes or releases (traces keep them).
    assert prompt_key_for_text("What is 1 + 1?") == "e265702b26f3ffa7"


def test_chat_template_renders_the_prompt_as_a_user_turn():
    records, _ = import_records([QWEN_10], chat_template=True)
    assert as_text(records[0].prompt_tokens) == "[u]What is 1 + 1?[/u]"
    assert records[0].prompt_key == prompt_key_for_text("What is 1 + 1?")


def test_codet_samples_python_literal_and_json_list():
    records, sources = import_records([CODET])
    assert len(sources) == 1 and len(records) == 6
    assert [as_text(r.response_tokens) for r in records[:3]] == [
        "    return a + b\n",
        "    return b + a\n",
        "    s = a + b\n    return s\n",
    ]
    assert as_text(records[5].response_tokens) == "    return x * -1\n"
    assert [r.sample_index for r in records] == [0, 1, 2, 0, 1, 2]


def test_codet_samples_per_step_splits_each_prompt_into_steps():
    records, sources = import_records([CODET], samples_per_step=2)
    # 3 samples per prompt in chunks of 2: step 0 holds samples 0-1, step 1 sample 2
    assert [(r.step, r.prompt_index, r.sample_index) for r in records] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (0, 1, 1),
        (1, 0, 0),
        (1, 1, 0),
    ]
    assert [(s.step, s.chunk) for s in sources] == [(0, 0), (1, 1)]


def test_generic_step_field_orders_steps_after_earlier_files():
    records, sources = import_records([QWEN_10, GENERIC, QWEN_20])
    # QWEN_10 is step 0; the generic file's steps 3 and 7 become 1 and 2; QWEN_20 is step 3
    assert [(s.step, s.label) for s in sources] == [(0, None), (1, 3), (2, 7), (3, None)]
    generic = [r for r in records if 0 < r.step < 3]
    assert [(r.step, as_text(r.response_tokens), r.finish_reason) for r in generic] == [
        (1, "red", "stop"),
        (1, "blue", "stop"),
        (1, "apple", "length"),
        (2, "green", "stop"),
        (2, "green", "length"),
        (2, "pear", "stop"),
    ]
    assert next(as_text(r.response_tokens) for r in records if r.step == 3) == "the product is 6"


def test_no_step_per_file_merges_files_into_shared_steps():
    records, sources = import_records([QWEN_10, QWEN_20], step_per_file=False)
    assert {r.step for r in records} == {0}
    assert [s.files for s in sources] == [(str(QWEN_10), str(QWEN_20))]
    # the prompt "What is 2 * 3?" now has 3 samples in the one step
    assert [r.sample_index for r in records if r.prompt_index == 1] == [0, 1, 2]


def test_gzip_input_is_read_by_magic_bytes_whatever_its_name(tmp_path):
    named_gz = tmp_path / "ckpt.jsonl.gz"
    unnamed = tmp_path / "ckpt_gzip_but_named.jsonl"
    for path in (named_gz, unnamed):
        path.write_bytes(gzip.compress(QWEN_20.read_bytes()))
    plain = read_generation_file(QWEN_20)
    for path in (named_gz, unnamed):
        read = read_generation_file(path)
        assert read.format == "qwen_math"
        assert read.samples == plain.samples


def test_summary_counts_and_percentiles():
    records, _ = import_records([GENERIC])
    summary = summarize_import(records)
    # responses: red blue apple green green pear -> 3 4 5 5 5 4 characters
    assert (summary.num_steps, summary.num_prompts, summary.num_rollouts) == (2, 2, 6)
    assert summary.num_response_tokens == 26
    assert (summary.p50, summary.max) == (4.5, 5)


MALFORMED = [
    # (file text, line, message part)
    (
        '{"prompt": "a", "responses": ["x"]}\n\n{"prompt": "b", "responses": 7}\n',
        3,
        "field 'responses' must be a list of strings, got int",
    ),
    (
        '{"prompt": "a", "responses": ["x", 2]}\n',
        1,
        "field 'responses' must be a list of strings, item 1 is int",
    ),
    ('{"prompt": "a", "response": "x"}\n{"prompt": 5, "response": "y"}\n', 2, "field 'prompt'"),
    ('{"prompt": "a", "response": "x"}\n{"prompt": "b"}\n', 2, "field 'responses' is missing"),
    (
        '{"prompt": "a", "response": "x", "finish_reason": "eos"}\n',
        1,
        "field 'finish_reason' must be one of ('stop', 'length'), got 'eos'",
    ),
    ('{"prompt": "a", "response": "x", "step": -1}\n', 1, "field 'step' must be a non-negative"),
    (
        '{"prompt": "a", "response": "x", "step": 1}\n{"prompt": "a", "response": "y"}\n',
        2,
        "field 'step' (or 'checkpoint') must be on every line",
    ),
    ('{"question": "q", "code": "not a list"}\n', 1, "field 'code' must be a list of strings"),
    ('{"prompt": "p", "samples": "[1, 2"}\n', 1, "field 'samples' must be a Python-literal"),
    ('{"prompt": "p", "samples": "__import__(\'os\')"}\n', 1, "Python-literal list"),
    ('{"prompt": "a", "response": "x"}\n{"prompt": "a", "resp', 2, "not valid JSON"),
    ('{"text": "a"}\n', 1, "cannot tell the format from fields (text)"),
]


@pytest.mark.parametrize(("text", "line", "message"), MALFORMED)
def test_malformed_lines_name_file_line_and_field(tmp_path, text, line, message):
    path = tmp_path / "gen.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        assign_steps([read_generation_file(path)])
    assert f"{path}:{line}: " in str(error.value)
    assert message in str(error.value)


# No "2" in the vocabulary: it becomes [UNK].
WORDS = ["[UNK]", "what", "is", "1", "+", "*", "3", "?", "one", "plus", "times", "three", "6"]
WORD_IDS = {word: index for index, word in enumerate(WORDS)}


@pytest.fixture(scope="module")
def word_tokenizer_folder(tmp_path_factory) -> Path:
    """A tiny real tokenizer folder (word level), loadable with AutoTokenizer.from_pretrained."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel(WORD_IDS, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("word_tokenizer")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(folder)
    return folder


def test_cli_writes_a_trace_that_reads_back_with_its_tokenizer(tmp_path, word_tokenizer_folder):
    from das.cli import main

    gz = tmp_path / "ckpt20.jsonl.gz"
    gz.write_bytes(gzip.compress(QWEN_20.read_bytes()))
    output = tmp_path / "traces" / "t.parquet"
    argv = ["import", "--output", str(output), "--tokenizer", str(word_tokenizer_folder)]
    assert main([*argv, "--no-progress", str(QWEN_10), str(gz)]) == 0
    records = read_trace(output)
    assert [r.step for r in records] == [0, 0, 0, 1, 1, 1]
    # "one plus one is 2" -> the ids of one, plus, one, is, and [UNK] for the unknown "2"
    expected = [WORD_IDS[word] for word in ("one", "plus", "one", "is", "[UNK]")]
    assert records[0].response_tokens.tolist() == expected
    assert records[0].prompt_key == records[4].prompt_key
    metadata = json.loads((tmp_path / "traces" / "t.meta.json").read_text())
    assert metadata["tokenizer"] == str(word_tokenizer_folder)
    assert [step["num_records"] for step in metadata["steps"]] == [3, 3]


def test_cli_error_leaves_no_output_behind(tmp_path, word_tokenizer_folder):
    from das.cli import main

    bad = tmp_path / "gen.jsonl"
    shutil.copy(QWEN_10, bad)
    with open(bad, "a") as handle:
        handle.write('{"question": "q", "code": [1]}\n')
    output = tmp_path / "out" / "t.parquet"
    argv = ["import", "--output", str(output), "--tokenizer", str(word_tokenizer_folder)]
    with pytest.raises(SystemExit, match=rf"{bad}:3: field 'code' must be a list of strings"):
        main([*argv, "--no-progress", str(QWEN_10), str(bad)])
    assert not output.parent.exists() or not any(output.parent.iterdir())
    # With --overwrite, a failing import leaves the earlier trace and its metadata untouched.
    assert main([*argv, "--no-progress", str(QWEN_10)]) == 0
    before = {path.name: path.read_bytes() for path in output.parent.iterdir()}
    with pytest.raises(SystemExit, match=rf"{bad}:3: "):
        main([*argv, "--no-progress", "--overwrite", str(QWEN_20), str(bad)])
    assert {path.name: path.read_bytes() for path in output.parent.iterdir()} == before


def test_numbered_files_out_of_numeric_order_are_warned_about(caplog):
    from das.cli.import_trace import warn_if_unordered

    with caplog.at_level(logging.WARNING):
        warn_if_unordered([Path("ckpt-21.jsonl.gz"), Path("ckpt-35.jsonl.gz")])
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        # what a shell glob gives: "105" sorts before "21" as text
        warn_if_unordered([Path("ckpt-105.jsonl.gz"), Path("ckpt-21.jsonl.gz")])
    assert "not in numeric order" in caplog.text
