"""The closing lines of ``das-rollout demo``: computed from the replay, whoever wins."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from das.cli.demo import explain_comparison


@dataclass(frozen=True)
class Step:
    """The fields of rollouts.replay.StepResult that the explanation reads."""

    step: int
    modelled_s: float
    forward_passes: int
    mean_accepted_len: float


def run(seconds: list[float], passes: list[int], accepted: list[float]) -> list[Step]:
    return [
        Step(i, *values) for i, values in enumerate(zip(seconds, passes, accepted, strict=True))
    ]


NONE = run([10, 10, 10], [100, 100, 100], [1, 1, 1])
NGRAM = run([9, 9, 9], [90, 90, 90], [1.1, 1.1, 1.1])
SUFFIX = run([8, 8, 8], [80, 80, 80], [1.3, 1.3, 1.3])
DAS_FIXED = run([9, 6, 5], [90, 60, 50], [1.1, 1.7, 2.0])
DAS_COST = run([8, 5, 4], [80, 50, 40], [1.2, 2.0, 2.5])


def test_das_winning_names_the_margin_the_vllm_baseline_and_the_reason() -> None:
    results = {
        "cpu": {
            "none": NONE,
            "ngram": NGRAM,
            "suffix_global": SUFFIX,
            "das_fixed": DAS_FIXED,
            "das_cost_model": DAS_COST,
        }
    }
    wins = {"das_fixed": {"prompt": 10, "global": 5, "own": 5}, "das_cost_model@cpu": {
        "prompt": 60, "global": 30, "own": 10}}  # fmt: skip
    lines = explain_comparison(results, wins)
    assert lines == [
        # none 30 s, das_cost_model 8+5+4 = 17 s: 30/17 = 1.76x; suffix_global 24 s = 1.41x 17.
        "Cost model cpu: das_cost_model was fastest, 17.0 s of modelled rollout time against "
        "30.0 s without speculation (1.76x, 43% less); the best vLLM-like method, "
        "suffix_global, took 24.0 s (1.41x the winner's time).",
        # passes 300 vs 170; acceptance (1.2 + 2.0 + 2.5) / 3 = 1.90; prompt share 60/100.
        "Why: das_cost_model ran 170 forward passes where no speculation ran 300 (1.76x "
        "fewer): each pass verified drafted tokens and kept 1.90 tokens per request on "
        "average instead of 1; 60% of its draft tokens came from earlier rollouts of the same "
        "prompt.",
        # step 0: 1 - 8/10; step 2: 1 - 4/10.
        "By step (cpu): step 0, with no earlier rollouts yet, took 20% less time than no "
        "speculation; step 2 took 60% less.",
    ]


def test_a_vllm_like_winner_is_reported_as_such_and_not_explained() -> None:
    results = {"h100": {"none": NONE, "suffix_global": DAS_COST, "das_fixed": SUFFIX}}
    lines = explain_comparison(results, {"das_fixed": {"prompt": 1}})
    assert lines == [
        "Cost model h100: suffix_global was fastest, 17.0 s of modelled rollout time against "
        "30.0 s without speculation (1.76x, 43% less)."
    ]


def test_the_first_cost_model_won_by_das_is_explained_and_losses_say_more() -> None:
    slow_start = run([11, 8, 4], [100, 70, 40], [1.0, 1.4, 2.5])  # 23 s; step 0 10% slower
    results = {
        "cpu": {"none": NONE, "ngram": NGRAM, "das_fixed": NGRAM},  # ngram first among equals
        "h100": {"none": NONE, "suffix_global": SUFFIX, "das_fixed": slow_start},
    }
    lines = explain_comparison(results, {})
    assert lines[0].startswith("Cost model cpu: ngram was fastest, 27.0 s")
    assert lines[1].startswith("Cost model h100: das_fixed was fastest, 23.0 s")
    assert lines[1].endswith("suffix_global, took 24.0 s (1.04x the winner's time).")
    assert lines[2].startswith("Why: das_fixed ran 210 forward passes where no speculation ran 300")
    assert lines[2].endswith("instead of 1.")  # no source counts given
    assert lines[3] == (
        "By step (h100): step 0, with no earlier rollouts yet, took 10% more time than no "
        "speculation; step 2 took 60% less."
    )


def test_no_speedup_says_so() -> None:
    slower = run([11, 12, 13], [100, 100, 100], [1, 1, 1])
    lines = explain_comparison({"cpu": {"none": NONE, "ngram": slower}}, {})
    assert lines == ["Cost model cpu: no method beat no speculation (30.0 s modelled)."]


def test_each_cost_model_gets_its_own_winner() -> None:
    results = {
        "cpu": {"none": NONE, "ngram": NGRAM, "das_fixed": DAS_FIXED},
        "h100": {"none": NONE, "ngram": DAS_COST, "das_fixed": DAS_FIXED},
    }
    lines = explain_comparison(results, {})
    assert lines[0].startswith("Cost model cpu: das_fixed was fastest, 20.0 s")
    assert "the best vLLM-like method, ngram, took 27.0 s (1.35x" in lines[0]
    assert lines[1].startswith("Cost model h100: ngram was fastest, 17.0 s")


def test_missing_baseline_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"baseline='none' is not among the methods \['ngram'\]"):
        explain_comparison({"cpu": {"ngram": NGRAM}}, {})
