"""How many forward passes each request of a trace needs alone, drafting only from its own text.

On a trace of long generations a step lasts as long as its slowest request, and once that
request decodes alone a pass costs the same whatever it verifies: the step's time is that
request's passes. This replays every request by itself, greedy verification against the trace,
with drafts from its own text (prompt and tokens so far) only:

* ``tree_D``: a suffix tree of depth D over the request's text (DAS's own-text tree: the most
  frequent continuation of the match length whose draft scores best, at most ``K`` tokens and
  ``--spec-factor`` times the match, and match plus draft within D);
* ``recent``: the continuation of the most recent earlier occurrence of the longest suffix
  (up to 24 tokens) that occurred before, with the same limits and no depth bound.

It prints and writes, per step, every request's passes under each drafter and the largest
(the passes of the request that sets the step), and plots tokens per pass against response
length.

    python scripts/bench_own_text_passes.py --trace TRACE --json X.json --plot X.png
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import numpy as np

from das.atomic_json import write_json_atomically
from das.bench.script_args import trace_steps
from suffix_tree.tree import SuffixTree

logger = logging.getLogger(__name__)

RECENT_MAX_MATCH = 24
MIN_TOKEN_PROB = 0.1
_HASH_BASE = np.uint64(1_000_003)


def previous_occurrences(tokens: np.ndarray, max_match: int) -> np.ndarray:
    """``prev[n - 1, j]``: the largest ``j' < j`` whose ``n`` tokens ending at ``j'`` equal the
    ``n`` ending at ``j``, else -1 (n-grams compared by a 64-bit polynomial hash)."""
    length = len(tokens)
    values = tokens.astype(np.uint64) + np.uint64(1)
    prev = np.full((max_match, length), -1, dtype=np.int64)
    hashes = np.zeros(length, dtype=np.uint64)
    for n in range(1, min(max_match, length) + 1):
        shifted = np.zeros(length, dtype=np.uint64)
        shifted[n - 1 :] = values[: length - n + 1]
        with np.errstate(over="ignore"):
            hashes = hashes * _HASH_BASE + shifted  # the n-gram ending at each j >= n - 1
        ends = np.arange(n - 1, length)
        order = ends[np.argsort(hashes[ends], kind="stable")]  # equal hashes: ascending j
        same = hashes[order[1:]] == hashes[order[:-1]]
        prev[n - 1, order[1:][same]] = order[:-1][same]
    return prev


def accepted(draft: np.ndarray, truth: np.ndarray) -> int:
    """Leading tokens of ``draft`` equal to ``truth``'s."""
    n = min(len(draft), len(truth))
    mismatch = np.flatnonzero(draft[:n] != truth[:n])
    return int(mismatch[0]) if len(mismatch) else n


def passes_alone(
    prompt: np.ndarray, response: np.ndarray, drafter: str, k: int, spec_factor: float
) -> int:
    """Forward passes to produce ``response`` alone, each verifying one draft of ``drafter``
    (``tree_D`` or ``recent``) and keeping its accepted prefix plus one token."""
    text = np.concatenate([prompt, response]).astype(np.int32)
    position, end = len(prompt), len(text)
    tree = None
    prev = None
    if drafter == "recent":
        prev = previous_occurrences(text, RECENT_MAX_MATCH)
    else:
        depth = int(drafter.removeprefix("tree_"))
        tree = SuffixTree(max_depth=depth)
        tree.extend(0, text[:position])
    passes = 0
    while position < end:
        if tree is not None:
            draft = tree.speculate(
                text[max(0, position - tree.max_depth) : position], k, MIN_TOKEN_PROB, spec_factor
            ).tokens
        else:
            draft = recent_draft(text, position, prev, k, spec_factor)
        step = min(accepted(draft, text[position:]) + 1, end - position)
        if tree is not None:
            tree.extend(0, text[position : position + step])
        position += step
        passes += 1
    return passes


def recent_draft(
    text: np.ndarray, position: int, prev: np.ndarray, k: int, spec_factor: float
) -> np.ndarray:
    """What followed the latest earlier occurrence of the longest suffix of ``text[:position]``
    that occurred before, within what is known at ``position``."""
    last = position - 1
    for n in range(min(RECENT_MAX_MATCH, position), 0, -1):
        earlier = prev[n - 1, last]
        if earlier >= 0:
            start = earlier + 1
            length = min(k, int(n * spec_factor + 1e-6), position - start)
            return text[start : start + length]
    return text[:0]


def plot_passes(rows: list[dict], drafters: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    tokens = np.array([row["tokens"] for row in rows])
    for drafter in drafters:
        passes = np.array([row["passes"][drafter] for row in rows])
        ax.scatter(tokens, tokens / passes, s=12, label=drafter, alpha=0.7)
    setters = [row for row in rows if row["sets_the_step"]]
    ax.scatter(
        [row["tokens"] for row in setters],
        [row["tokens"] / row["passes"][drafters[0]] for row in setters],
        s=80,
        facecolors="none",
        edgecolors="black",
        label=f"sets its step ({drafters[0]})",
    )
    ax.set_xlabel("response tokens")
    ax.set_ylabel("tokens per pass, alone")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout trace")
    parser.add_argument("--k", type=int, default=32, help="draft tokens per pass at most")
    parser.add_argument("--depths", default="24,48", help="suffix tree depths, comma-separated")
    parser.add_argument("--spec-factor", type=float, default=2.0, help="draft / match at most")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.k < 1:
        parser.error(f"--k {args.k} must be >= 1")
    if not args.spec_factor > 0:
        parser.error(f"--spec-factor {args.spec_factor} must be > 0")
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--depths {args.depths!r} must be comma-separated integers")
    if any(d < 2 for d in depths):
        parser.error(f"--depths {args.depths!r}: every depth must be >= 2")
    drafters = [f"tree_{d}" for d in depths] + ["recent"]
    steps = trace_steps(parser, args.trace)
    rows: list[dict] = []
    summary: dict[str, dict] = {}
    for step, records in steps.items():
        step_rows = []
        for index, record in enumerate(records):
            prompt = np.asarray(record.prompt_tokens)
            response = np.asarray(record.response_tokens)
            passes = {
                d: passes_alone(prompt, response, d, args.k, args.spec_factor) for d in drafters
            }
            step_rows.append(
                {"step": step, "row": index, "tokens": len(response), "passes": passes}
            )
        slowest = {d: max(row["passes"][d] for row in step_rows) for d in drafters}
        setter = max(step_rows, key=lambda row: row["passes"][drafters[0]])
        for row in step_rows:
            row["sets_the_step"] = row is setter
        summary[str(step)] = {
            "slowest_passes": slowest,
            "setter": {"row": setter["row"], "tokens": setter["tokens"], **setter["passes"]},
        }
        rows.extend(step_rows)
        logger.info(
            "step %d: slowest request alone, passes %s; set by row %d (%d tokens)",
            step,
            " ".join(f"{d} {n}" for d, n in slowest.items()),
            setter["row"],
            setter["tokens"],
        )
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "trace": args.trace.name,
        "k": args.k,
        "spec_factor": args.spec_factor,
        "drafters": drafters,
        "steps": summary,
        "requests": rows,
    }
    if args.json:
        write_json_atomically(report, args.json, indent=1)
        logger.info("wrote %s", args.json)
    if args.plot:
        plot_passes(rows, drafters, f"{args.trace.name}: own-text drafts, K = {args.k}", args.plot)
        logger.info("wrote %s", args.plot)
    return report


if __name__ == "__main__":
    main()
