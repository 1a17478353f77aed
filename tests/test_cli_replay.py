"""``das-rollout replay`` end to end on the committed small trace (no vLLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from das.cli import main

SMALL_TRACE = Path(__file__).parent / "data" / "trace_small.parquet"


def test_replay_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "replay.json"
    plot = tmp_path / "replay.png"
    code = main(
        [
            "--log-level", "WARNING", "replay", str(SMALL_TRACE),
            "--methods", "none,suffix_global,das_cost_model",
            "--cost", "flat=0.01,0.00001,256", "--cost", "steep=0.01,0.001",
            "--json", str(out), "--plot", str(plot),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("das-rollout")
    assert set(data["cost_models"]) == {"flat", "steep"}
    for cost_model in data["cost_models"].values():
        methods = cost_model["methods"]
        assert set(methods) == {"none", "suffix_global", "das_cost_model"}
        none_steps = methods["none"]["steps"]
        assert [s["step"] for s in none_steps] == data["trace"]["steps"]
        for row in methods["das_cost_model"]["steps"]:
            assert {"step", "modelled_s", "forward_passes", "mean_accepted_len"} <= set(row)
        # Speculation never needs more passes than plain decoding.
        for spec, plain in zip(methods["suffix_global"]["steps"], none_steps, strict=True):
            assert spec["forward_passes"] <= plain["forward_passes"]
    assert plot.stat().st_size > 10_000
    assert "cost model flat" in capsys.readouterr().out


def test_replay_errors_name_the_bad_input(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(SMALL_TRACE.read_bytes()[:500])
    with pytest.raises(SystemExit, match=r"broken\.parquet"):
        main(["replay", str(broken), "--methods", "none", "--cost", "0.01,0.001"])
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['warp'\]"):
        main(["replay", str(SMALL_TRACE), "--methods", "warp"])
    with pytest.raises(SystemExit, match="bad --cost 'x=1,2,3,4,5,6,7,8,9'"):
        main(["replay", str(SMALL_TRACE), "--cost", "x=1,2,3,4,5,6,7,8,9"])


def test_max_num_seqs_caps_the_running_requests(tmp_path):
    def passes(*extra: str) -> tuple[list[int], dict]:
        out = tmp_path / "replay.json"
        main(
            [
                "--log-level", "WARNING", "replay", str(SMALL_TRACE), "--methods", "none",
                "--cost", "flat=0.01,0.00001", "--jobs", "1", "--json", str(out), *extra,
            ]
        )  # fmt: skip
        data = json.loads(out.read_text())
        steps = data["cost_models"]["flat"]["methods"]["none"]["steps"]
        return [s["forward_passes"] for s in steps], data["engine"]

    unbounded, engine = passes()
    assert engine["max_num_seqs"] == 1024
    capped, engine = passes("--max-num-seqs", "4")
    assert engine["max_num_seqs"] == 4
    # The trace has 64 rollouts a step: 4 at a time must take longer than all at once.
    assert all(c > u for c, u in zip(capped, unbounded, strict=True))
    with pytest.raises(SystemExit, match="--max-num-seqs=0 must be >= 1"):
        main(["replay", str(SMALL_TRACE), "--methods", "none", "--max-num-seqs", "0"])


def test_das_options_reach_the_drafters_and_bad_keys_are_named(tmp_path):
    def draft_tokens(*extra: str) -> int:
        out = tmp_path / "replay.json"
        main(
            [
                "--log-level", "WARNING", "replay", str(SMALL_TRACE), "--methods", "das_fixed",
                "--cost", "flat=0.01,0.00001", "--jobs", "1", "--json", str(out), *extra,
            ]
        )  # fmt: skip
        steps = json.loads(out.read_text())["cost_models"]["flat"]["methods"]["das_fixed"]
        return sum(s["draft_tokens"] for s in steps["steps"])

    everywhere = draft_tokens()
    # Drafting only in batches of at most 16 requests: only where a step is down to its tail.
    tail_only = draft_tokens("--das-option", "max_draft_batch=16")
    assert 0 < tail_only < everywhere / 4
    with pytest.raises(SystemExit, match=r"unknown DAS config key\(s\) \['warp'\]"):
        main(["replay", str(SMALL_TRACE), "--methods", "none", "--das-option", "warp=1"])
    with pytest.raises(SystemExit, match="max_draft_batch=0"):
        main(["replay", str(SMALL_TRACE), "--methods", "none", "--das-option", "max_draft_batch=0"])
    with pytest.raises(SystemExit, match="'max_draft_batch' must be KEY=VALUE"):
        main(["replay", str(SMALL_TRACE), "--methods", "none", "--das-option", "max_draft_batch"])
