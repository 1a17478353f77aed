"""Recording rollouts with a real vLLM engine on the default model (slow: starts an engine)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from das.vllm.engine import chat_prompt_token_ids, make_llm
from das.vllm.record import (
    length_summary,
    metadata_path_for,
    plot_length_histogram,
    record_rollouts,
)
from rollouts.prompts import builtin_prompts, format_gsm8k_messages, load_prompts
from rollouts.trace import group_by_step, prompt_key_for, read_trace

pytestmark = pytest.mark.slow

NUM_PROMPTS = 4
NUM_SAMPLES = 2
NUM_STEPS = 2
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def llm():
    """One engine for the module: vLLM takes about a minute to start on a CPU. The dtype is the
    machine's, as ``record`` picks it: bfloat16 runs about 6x slower on a CPU without AVX-512."""
    engine = make_llm(None, dtype="auto", max_model_len=1024, seed=0)
    yield engine
    del engine


@pytest.fixture(scope="module")
def prompts():
    try:
        return load_prompts(None, NUM_PROMPTS, seed=0)
    except ValueError:
        return builtin_prompts(NUM_PROMPTS, seed=0)


@pytest.fixture(scope="module")
def recorded(llm, prompts, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.parquet"
    records = record_rollouts(
        None,
        prompts,
        num_samples=NUM_SAMPLES,
        num_steps=NUM_STEPS,
        temperature=0.6,
        top_p=1.0,
        max_tokens=MAX_TOKENS,
        seed=0,
        output_path=path,
        llm=llm,
        progress=False,
    )
    return path, records


def test_trace_on_disk_equals_returned_records(recorded) -> None:
    path, records = recorded
    assert read_trace(path) == records


def test_every_request_is_recorded_once(recorded, prompts) -> None:
    _, records = recorded
    assert len(records) == NUM_PROMPTS * NUM_SAMPLES * NUM_STEPS
    seen = Counter((r.step, r.prompt_index, r.sample_index) for r in records)
    expected = {
        (step, prompt.index, sample)
        for step in range(NUM_STEPS)
        for prompt in prompts
        for sample in range(NUM_SAMPLES)
    }
    assert set(seen) == expected and max(seen.values()) == 1
    assert list(group_by_step(records)) == list(range(NUM_STEPS))


def test_responses_are_finished_and_within_the_cap(recorded, llm) -> None:
    _, records = recorded
    eos = llm.get_tokenizer().eos_token_id
    for record in records:
        assert record.finish_reason in ("stop", "length")
        assert 1 <= record.num_response_tokens <= MAX_TOKENS
        if record.finish_reason == "length":
            assert record.num_response_tokens == MAX_TOKENS
        else:
            # Stopped on the end-of-turn token, which vLLM keeps as the last token.
            assert record.response_tokens[-1] == eos
        assert record.wall_s > 0


def test_prompt_tokens_and_keys_match_the_chat_template(recorded, llm, prompts) -> None:
    _, records = recorded
    tokenizer = llm.get_tokenizer()
    by_index = {prompt.index: prompt for prompt in prompts}
    keys_by_prompt: dict[int, set[str]] = {}
    for record in records:
        messages = format_gsm8k_messages(by_index[record.prompt_index].text)
        expected = chat_prompt_token_ids(tokenizer, messages)
        assert record.prompt_tokens.tolist() == expected
        assert record.prompt_key == prompt_key_for(expected)
        keys_by_prompt.setdefault(record.prompt_index, set()).add(record.prompt_key)
    # The same prompt has the same key at every step; different prompts have different keys.
    assert all(len(keys) == 1 for keys in keys_by_prompt.values())
    assert len({next(iter(keys)) for keys in keys_by_prompt.values()}) == NUM_PROMPTS


def test_samples_differ_at_temperature(recorded) -> None:
    _, records = recorded
    responses = {tuple(record.response_tokens.tolist()) for record in records}
    assert len(responses) > len(records) // 2


def test_metadata_and_plot(recorded, tmp_path: Path) -> None:
    path, records = recorded
    metadata = json.loads(metadata_path_for(path).read_text())
    assert metadata["max_tokens"] == MAX_TOKENS
    assert [step["step"] for step in metadata["steps"]] == list(range(NUM_STEPS))
    assert sum(step["num_records"] for step in metadata["steps"]) == len(records)
    summary = length_summary(records)
    assert metadata["length_summary"]["mean"] == pytest.approx(summary.mean)
    assert summary.max <= MAX_TOKENS
    expected_truncated = np.mean([record.finish_reason == "length" for record in records])
    assert summary.share_truncated == pytest.approx(expected_truncated)
    png = plot_length_histogram(records, tmp_path / "lengths.png", max_tokens=MAX_TOKENS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_trace_is_not_overwritten(recorded, llm, prompts) -> None:
    path, _ = recorded
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=str(path)):
        record_rollouts(
            None,
            prompts,
            num_samples=1,
            num_steps=1,
            temperature=0.6,
            top_p=1.0,
            max_tokens=4,
            seed=0,
            output_path=path,
            llm=llm,
            progress=False,
        )
    assert path.read_bytes() == before
