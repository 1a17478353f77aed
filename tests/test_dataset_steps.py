"""Replaying a trace as if the dataset were E times one step's prompts."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rollouts.dataset_steps import spread_steps
from rollouts.trace import RolloutRecord

NUM_PROMPTS = 6
NUM_SAMPLES = 3
NUM_STEPS = 4


def record(prompt: int, step: int, sample: int) -> RolloutRecord:
    return RolloutRecord(
        prompt_key=f"key-{prompt}",
        step=step,
        sample_index=sample,
        prompt_tokens=[1, prompt + 2],
        response_tokens=[step + 3, sample + 3, prompt + 3],  # tells where it came from
        finish_reason="stop",
        prompt_index=prompt,
        wall_s=0.0,
    )


def trace() -> dict[int, list[RolloutRecord]]:
    # Recorded steps numbered 10, 11, ...: replay numbering must not depend on it.
    return {
        10 + step: [record(p, 10 + step, s) for p in range(NUM_PROMPTS) for s in range(NUM_SAMPLES)]
        for step in range(NUM_STEPS)
    }


@pytest.mark.parametrize("num_groups", [2, 3, 6])
def test_a_prompt_returns_every_e_steps_with_its_recorded_step_in_order(num_groups: int) -> None:
    spread = spread_steps(trace(), num_groups)
    assert sorted(spread) == list(range(NUM_STEPS * num_groups))
    steps_of: dict[str, list[int]] = {}
    for step, records in spread.items():
        assert all(r.step == step for r in records)
        for key in dict.fromkeys(r.prompt_key for r in records):
            steps_of.setdefault(key, []).append(step)
            # The k-th appearance holds the prompt's rollouts from the k-th recorded step.
            recorded = {int(r.response_tokens[0]) - 3 for r in records if r.prompt_key == key}
            assert recorded == {10 + step // num_groups}
    assert len(steps_of) == NUM_PROMPTS
    for appearances in steps_of.values():
        assert len(appearances) == NUM_STEPS
        assert all(b - a == num_groups for a, b in itertools.pairwise(appearances))
    sizes = {len({r.prompt_key for r in records}) for records in spread.values()}
    assert sizes == {NUM_PROMPTS // num_groups}


def test_each_step_holds_whole_sibling_groups() -> None:
    spread = spread_steps(trace(), 3)
    for records in spread.values():
        samples: dict[str, list[int]] = {}
        for r in records:
            samples.setdefault(r.prompt_key, []).append(r.sample_index)
        assert all(sorted(s) == list(range(NUM_SAMPLES)) for s in samples.values())
    assert sum(len(records) for records in spread.values()) == NUM_PROMPTS * NUM_SAMPLES * NUM_STEPS


def test_one_dataset_step_only_renumbers() -> None:
    original = trace()
    spread = spread_steps(original, 1)
    assert list(spread) == [0, 1, 2, 3]
    for (old_step, old), new in zip(original.items(), spread.values(), strict=True):
        assert [r.prompt_key for r in old] == [r.prompt_key for r in new]
        assert all(r.step == old_step for r in old)  # inputs are left untouched


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "dataset_steps=0"),
        (-2, "dataset_steps=-2"),
        (7, "dataset_steps=7 must be <= the 6 prompts"),
    ],
)
def test_bad_dataset_steps_are_named(value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spread_steps(trace(), value)


def test_replay_cli_names_a_bad_dataset_steps_value() -> None:
    from das.cli import main

    trace_path = Path(__file__).parent / "data" / "trace_small.parquet"
    with pytest.raises(SystemExit, match="dataset_steps=17 must be <= the 16 prompts"):
        main(["replay", str(trace_path), "--methods", "none", "--dataset-steps", "17"])
