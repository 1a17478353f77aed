"""Signals of which rollouts run to the token cap (rollouts/length_signals.py) and their script."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rollouts.length_signals import (
    first_repeat_position,
    repetition_detector,
    truncation_by_history,
    truncation_given_alive,
)
from rollouts.trace import RolloutRecord, read_trace

ROOT = Path(__file__).resolve().parents[1]
LOOP = [7, 8, 9] * 20  # repeats a 3-token span from token 6 on
FRESH = list(range(100, 160))  # never repeats


def record(prompt: str, step: int, tokens: list[int], reason: str, sample: int = 0):
    return RolloutRecord(
        prompt_key=prompt,
        step=step,
        sample_index=sample,
        prompt_tokens=np.array([1, 2, 3], np.int32),
        response_tokens=np.array(tokens, np.int32),
        finish_reason=reason,
        prompt_index=0,
        wall_s=1.0,
    )


def test_first_repeat_position_finds_the_first_repeated_span() -> None:
    assert first_repeat_position([1, 2, 3, 1, 2, 3, 1], 3) == 6
    assert first_repeat_position([1, 2, 3, 1, 2, 4], 3) is None
    assert first_repeat_position([5, 5, 5], 2) == 3  # overlapping spans count
    assert first_repeat_position(FRESH, 1) is None
    assert first_repeat_position([], 4) is None
    with pytest.raises(ValueError, match="window=0"):
        first_repeat_position([1, 2], 0)


def test_repetition_detector_counts_each_outcome_and_how_early_it_flagged() -> None:
    records = [
        record("a", 0, LOOP, "length"),  # flagged at 6, truncated: 54 tokens after the flag
        record("a", 0, LOOP[:30], "stop", 1),  # flagged, not truncated
        record("b", 0, FRESH, "length"),  # truncated, never flagged
        record("b", 0, FRESH[:10], "stop", 1),  # neither
    ]
    score = repetition_detector(records, 3)
    counts = (
        score.true_positives,
        score.false_positives,
        score.false_negatives,
        score.true_negatives,
    )
    assert counts == (1, 1, 1, 1)
    assert score.precision == 0.5 and score.recall == 0.5
    assert score.median_tokens_after_flag == len(LOOP) - 6
    # A span longer than the loop's period is repeated later: fewer tokens after the flag.
    assert repetition_detector(records, 9).median_tokens_after_flag == len(LOOP) - 12


def test_truncation_by_history_bins_rollouts_by_their_prompts_earlier_share() -> None:
    records = [
        # prompt a: both step-0 rollouts truncated; in step 1 one of two is.
        record("a", 0, FRESH, "length"),
        record("a", 0, FRESH, "length", 1),
        record("a", 1, FRESH, "length"),
        record("a", 1, FRESH[:5], "stop", 1),
        # prompt b: never truncated.
        record("b", 0, FRESH[:5], "stop"),
        record("b", 1, FRESH[:5], "stop"),
    ]
    bins = truncation_by_history(records, edges=(0.0, 0.5, 1.0))
    assert [b.rollouts for b in bins] == [1, 2]  # step-0 rollouts have no history
    assert bins[0].truncated_share == 0.0  # b's step-1 rollout
    assert bins[1].truncated_share == 0.5  # a's step-1 rollouts (earlier share 1.0)
    with pytest.raises(ValueError, match="edges"):
        truncation_by_history(records, edges=(0.5, 0.5))


def test_truncation_given_alive_splits_by_repetition_so_far() -> None:
    records = [
        record("a", 0, LOOP, "length"),  # 60 tokens, repeats from 6
        record("a", 0, FRESH, "length", 1),  # 60 tokens, never repeats
        record("a", 0, FRESH[:20], "stop", 2),  # 20 tokens
    ]
    early, late = truncation_given_alive(records, [4, 30], window=3)
    assert (early.alive, early.repeated, early.not_repeated) == (3, 0, 3)
    assert math.isclose(early.truncated_share, 2 / 3)
    assert (late.alive, late.repeated, late.not_repeated) == (2, 1, 1)
    assert late.truncated_share == 1.0
    with pytest.raises(ValueError, match="age=-1"):
        truncation_given_alive(records, [-1], window=3)


def test_script_writes_json_and_plot_consistent_with_the_trace(tmp_path, load_script) -> None:
    script = load_script("analyze_length_signals")
    trace = ROOT / "tests" / "data" / "trace_small.parquet"
    out = tmp_path / "signals.json"
    script.main(["--trace", str(trace), "--json", str(out)])
    report = json.loads(out.read_text())
    records = read_trace(trace)
    assert report["num_rollouts"] == len(records)
    for score in report["repetition_detectors"]:
        total = sum(
            score[key]
            for key in ("true_positives", "false_positives", "false_negatives", "true_negatives")
        )
        assert total == len(records)
    first_age = report["by_age"]["rows"][0]
    assert first_age["alive"] == sum(r.num_response_tokens > first_age["age"] for r in records)
    assert out.with_suffix(".png").stat().st_size > 0
