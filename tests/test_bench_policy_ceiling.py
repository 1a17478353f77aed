"""The replay ceiling benchmark on the small recorded trace in tests/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ceiling_benchmark_writes_every_method_and_the_oracle_knows_lengths(
    tmp_path, load_script
) -> None:
    bench = load_script("bench_policy_ceiling")
    out = tmp_path / "ceiling.json"
    bench.main(
        [
            "--trace",
            str(ROOT / "tests" / "data" / "trace_small.parquet"),
            "--cost",
            "h100",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "ceiling.png"),
        ]
    )
    report = json.loads(out.read_text())
    assert (tmp_path / "ceiling.png").stat().st_size > 0
    steps = report["steps"]
    assert set(steps) == set(bench.METHODS)
    assert all(len(rows) == 3 for rows in steps.values())
    summary = report["summary_steps_2_on"]
    assert summary["none"]["iterations_vs_none"] == 1.0
    assert summary["none"]["draft_tokens"] == 0
    # A forward pass yields at most K + 1 tokens of a request, and at least 1.
    longest = max(row["decode_iterations"] for row in steps["none"])
    for rows in steps.values():
        for row in rows:
            assert longest / (report["num_speculative_tokens"] + 1) <= row["decode_iterations"]
            assert row["decode_iterations"] <= longest
    # The oracle spends drafts on the binding request: it saves iterations.
    assert summary["makespan_oracle"]["iterations_vs_none"] < 1.0
    # Drafts cut at their first rejected token: every one is accepted, the iterations are K =
    # 16's, and no step costs more than K = 16's, under the measured H100 table.
    for cut, full in zip(steps["oracle_drafts"], steps["das_fixed"], strict=True):
        assert cut["accepted_tokens"] == cut["draft_tokens"] > 0
        assert cut["decode_iterations"] == full["decode_iterations"]
        assert cut["modelled_s"] < full["modelled_s"]
        for key in ("row", "passes", "tokens"):
            assert cut["slowest_request"][key] == full["slowest_request"][key]
        assert cut["slowest_request"]["rejected_draft_tokens"] == 0
        assert cut["rejected_draft_tokens_at_the_cap"] == 0
    # Requests at the cap reject part of what the full drafts give them, never more than all.
    for row in steps["das_fixed"]:
        rejected = row["draft_tokens"] - row["accepted_tokens"]
        assert 0 < row["rejected_draft_tokens_at_the_cap"] < rejected
        assert row["requests_at_the_cap"] > 0
    # Choosing, per request, the source whose draft the trace accepts furthest: still no wasted
    # draft token, and fewer iterations than verifying the best-scored source's draft.
    for chosen, scored in zip(steps["oracle_sources"], steps["oracle_drafts"], strict=True):
        assert chosen["accepted_tokens"] == chosen["draft_tokens"]
        assert chosen["decode_iterations"] < scored["decode_iterations"]
    # Drafting, from each source, what its tree holds through any branch: no wasted token, and
    # at least as far as every source's most frequent branch (fewer iterations in some step).
    trees, sources = steps["oracle_trees"], steps["oracle_sources"]
    for chosen, greedy in zip(trees, sources, strict=True):
        assert chosen["accepted_tokens"] == chosen["draft_tokens"]
        assert chosen["decode_iterations"] <= greedy["decode_iterations"]
    assert sum(r["decode_iterations"] for r in trees) < sum(r["decode_iterations"] for r in sources)
    # Trees merged over every match draft other nodes than trees below the best match.
    merged, single = steps["das_merged_tree_drafts"], steps["das_tree_drafts"]
    assert [r["draft_tokens"] for r in merged] != [r["draft_tokens"] for r in single]
    # The slowest request of a step without drafts is its longest response.
    for row in steps["none"]:
        assert row["slowest_request"]["passes"] == row["slowest_request"]["tokens"] == longest
    # Its passes alone are a floor under every step: cheaper than the whole step, and more than
    # a quarter of it without drafts here (64 requests in the flat part of the H100 curve).
    for rows in steps.values():
        for row in rows:
            assert 0 < row["slowest_request"]["alone_s"] < row["modelled_s"]
    for row in steps["none"]:
        assert row["slowest_request"]["alone_s"] > row["modelled_s"] / 4


def test_ceiling_benchmark_names_a_missing_trace(tmp_path, capsys, load_script) -> None:
    bench = load_script("bench_policy_ceiling")
    missing = tmp_path / "nope.parquet"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--trace", str(missing)])
    assert exit_.value.code == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("methods", ["none,suffix_global,oracle_tree", "none,das_tree_drafts"])
def test_ceiling_benchmark_names_methods_it_cannot_replay(capsys, load_script, methods) -> None:
    bench = load_script("bench_policy_ceiling")
    trace = str(ROOT / "tests" / "data" / "trace_small.parquet")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--trace", trace, "--methods", methods])
    assert exit_.value.code == 2
    assert f"--methods {methods}" in capsys.readouterr().err


def test_ceiling_benchmark_replays_the_methods_asked_with_the_tree_size_asked(
    tmp_path, load_script
) -> None:
    bench = load_script("bench_policy_ceiling")
    out = tmp_path / "trees.json"
    trace = str(ROOT / "tests" / "data" / "trace_small.parquet")
    common = ["--trace", trace, "--cost", "h100", "--methods", "none,suffix_global,das_tree_drafts"]
    bench.main([*common, "--json", str(out), "--tree-nodes", "1"])
    one = json.loads(out.read_text())
    assert set(one["steps"]) == {"none", "suffix_global", "das_tree_drafts"}
    assert one["tree_nodes"] == 1
    assert one["command"].endswith("--methods none,suffix_global,das_tree_drafts --tree-nodes 1")
    bench.main([*common, "--json", str(out)])
    sixteen = json.loads(out.read_text())
    # Trees of one node accept less than trees of 16 (the batches above 32 draft paths alike).
    assert sum(r["accepted_tokens"] for r in one["steps"]["das_tree_drafts"]) < sum(
        r["accepted_tokens"] for r in sixteen["steps"]["das_tree_drafts"]
    )


def test_ceiling_benchmark_bounds_every_tree_at_the_depth_asked(tmp_path, load_script) -> None:
    bench = load_script("bench_policy_ceiling")
    out = tmp_path / "shallow.json"
    trace = str(ROOT / "tests" / "data" / "trace_small.parquet")
    common = ["--trace", trace, "--cost", "h100", "--k", "8", "--json", str(out)]
    common += ["--methods", "none,suffix_global,oracle_drafts"]
    bench.main(common)
    deep = json.loads(out.read_text())
    bench.main([*common, "--max-depth", "3"])
    shallow = json.loads(out.read_text())
    assert shallow["max_depth"] == 3
    assert "--k 8 --max-depth 3 --methods" in shallow["command"]
    assert deep["max_depth"] == 24
    # A tree of depth 3 holds a match of at least one token and at most two draft tokens after
    # it: every pass yields at most 3 tokens of a request, whatever K allows.
    longest = max(row["decode_iterations"] for row in shallow["steps"]["none"])
    for method in ("suffix_global", "oracle_drafts"):
        for row, deeper in zip(shallow["steps"][method], deep["steps"][method], strict=True):
            assert row["decode_iterations"] >= longest / 3
            assert row["accepted_tokens"] < deeper["accepted_tokens"]


def test_ceiling_benchmark_names_a_depth_too_small_for_a_draft(
    tmp_path, capsys, load_script
) -> None:
    bench = load_script("bench_policy_ceiling")
    trace = str(ROOT / "tests" / "data" / "trace_small.parquet")
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--trace", trace, "--max-depth", "1", "--json", str(out)])
    assert not out.exists()
    assert exit_.value.code == 2
    assert "--max-depth 1" in capsys.readouterr().err
