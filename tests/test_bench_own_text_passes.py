"""The own-text passes benchmark: its reference drafter and its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_previous_occurrences_match_a_brute_force_search(load_script) -> None:
    bench = load_script("bench_own_text_passes")
    tokens = np.random.default_rng(0).integers(0, 3, size=200).astype(np.int32)
    prev = bench.previous_occurrences(tokens, 6)
    for n in range(1, 7):
        for j in range(len(tokens)):
            expected = -1
            if j >= n - 1:
                gram = tuple(tokens[j - n + 1 : j + 1])
                for earlier in range(j - 1, n - 2, -1):
                    if tuple(tokens[earlier - n + 1 : earlier + 1]) == gram:
                        expected = earlier
                        break
            assert prev[n - 1, j] == expected, (n, j)


def test_recent_drafts_copy_only_tokens_known_at_the_position(load_script) -> None:
    bench = load_script("bench_own_text_passes")
    text = np.array([5, 6, 7, 5, 6, 7, 5, 6], dtype=np.int32)
    prev = bench.previous_occurrences(text, 24)
    # At position 5 the text so far is 5 6 7 5 6: "5 6" occurred at 0-1, followed by 7 5 6;
    # only 7 5 6 (positions 2-4) is known, whatever K and the factor allow.
    draft = bench.recent_draft(text, 5, prev, 32, 4.0)
    assert draft.tolist() == [7, 5, 6]


def test_passes_alone_need_every_token_without_repeats_and_few_with_them(load_script) -> None:
    bench = load_script("bench_own_text_passes")
    prompt = np.array([1000, 1001], dtype=np.int32)
    distinct = np.arange(100, dtype=np.int32)
    periodic = np.tile(np.arange(10, dtype=np.int32), 20)
    for drafter in ("tree_24", "tree_48", "recent"):
        assert bench.passes_alone(prompt, distinct, drafter, 32, 2.0) == len(distinct)
        # After the first period every draft runs its full length: 200 tokens in far fewer.
        assert bench.passes_alone(prompt, periodic, drafter, 32, 2.0) < 40, drafter


def test_report_names_the_request_that_sets_each_step(tmp_path, load_script) -> None:
    bench = load_script("bench_own_text_passes")
    out = tmp_path / "own.json"
    bench.main(
        [
            "--trace",
            str(ROOT / "tests" / "data" / "trace_small.parquet"),
            "--k",
            "16",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "own.png"),
        ]
    )
    report = json.loads(out.read_text())
    assert (tmp_path / "own.png").stat().st_size > 0
    assert report["drafters"] == ["tree_24", "tree_48", "recent"]
    for step, summary in report["steps"].items():
        rows = [row for row in report["requests"] if str(row["step"]) == step]
        setter = [row for row in rows if row["sets_the_step"]]
        assert len(setter) == 1
        assert setter[0]["passes"]["tree_24"] == summary["slowest_passes"]["tree_24"]
        for row in rows:
            for passes in row["passes"].values():
                # A pass keeps at least one token and at most K + 1.
                assert row["tokens"] / 17 <= passes <= row["tokens"]
