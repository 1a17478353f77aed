"""Where the branch the target takes lies in a tree of the most probable positions.

Replays a trace with the tree drafter of ``bench_policy_ceiling.py`` (``das_tree_drafts``:
trees of up to 16 nodes in batches of at most 32 requests) and, at each of its tree passes
after the first step, for each request and each source:

* how far the source's tree holds what the target produces next, through any branch below
  any match (:meth:`suffix_tree.SuffixForest.known_continuations`, the ``oracle_trees``
  ceiling), and
* how far a tree of the 16 most probable positions below the match whose tree sums highest
  gets (:meth:`suffix_tree.SuffixForest.tree_drafts`), and how many such positions, best
  first, it would take to get as far (up to ``--max-nodes``), and whether that match is longer
  than the longest one below which the tokens lie that far (a shorter match's tree holds every
  continuation of a longer one's, so otherwise the tokens lie among rarer continuations).

For each request, the source whose tree holds the target's tokens furthest is counted. It
prints and writes to JSON the share of such rows where the 16-node tree falls short of the
ceiling, and, among those, how many best-first nodes reaching the ceiling's depth takes.

    python scripts/bench_tree_branch_rank.py \\
        --trace ~/.cache/das/traces/skythought_ckpt21_63.parquet \\
        --json benchmarks/results/tree_branch_rank_skythought.json
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from das import methods
from das.atomic_json import write_json_atomically
from das.bench import script_args
from das.bench.trace_oracle import TraceView, truth_matrix
from das.bench.tree_drafts import TreeDraftDrafter
from policies.profiles import TABLE_PROFILES, policy_cost_model
from rollouts.replay import replay_step

logger = logging.getLogger("bench_tree_branch_rank")

TREE_NODES = 16
UNREACHED = -1  # the ceiling's depth is not within --max-nodes best-first positions


class BranchRankProbe(TreeDraftDrafter):
    """:class:`TreeDraftDrafter` that, before each tree pass after the first step, records per
    request, for the source whose tree holds the most: (ceiling depth, depth of the
    ``TREE_NODES``-node tree, best-first nodes needed to reach the ceiling's depth or
    ``UNREACHED``, 1 if the tree's match is longer than the ceiling's else 0)."""

    def __init__(self, *args: Any, probe_nodes: int, first_step: int, **kwargs: Any) -> None:
        super().__init__(*args, max_nodes=TREE_NODES, **kwargs)
        self.probe_nodes = probe_nodes
        self.first_step = first_step
        self.records: list[tuple[int, int, int, int]] = []

    def propose(
        self, request_ids: Sequence[Hashable], max_tokens: np.ndarray | int | None = None
    ) -> Any:
        rows = len(request_ids)
        if 0 < rows <= self.max_tree_batch and self.step > self.first_step:
            self._probe(request_ids)
        return super().propose(request_ids, max_tokens)

    def _probe(self, request_ids: Sequence[Hashable]) -> None:
        rows = len(request_ids)
        requests = [self._request(rid) for rid in request_ids]
        slots = np.fromiter((r.own_slot for r in requests), np.int64, rows)
        roots, match_slots = self._lookup_trees(requests, slots)
        sources = len(self._enabled_sources)
        k = self.config.num_speculative_tokens
        truth, lens = truth_matrix(self.truths, k + 1)
        factor = self.config.spec_factor_for(self.cost.knee_tokens)
        rows_args = (roots, np.tile(slots, sources), np.tile(truth, (sources, 1)))
        known, known_match = self.forest.known_continuations(
            *rows_args,
            np.tile(lens, sources),
            np.full(sources * rows, k),
            max_spec_factor=factor,
            match_slots=match_slots,
        )
        _, accepted, num, tree_match = self.forest.tree_drafts(
            *rows_args,
            np.tile(lens, sources),
            self.probe_nodes,
            k,
            max_spec_factor=factor,
            match_slots=match_slots,
        )
        known = known.reshape(sources, rows)
        accepted = accepted.reshape(sources, rows, -1)
        num = num.reshape(sources, rows)
        # > 0: the tree grew below a longer match than the one below which the tokens lie.
        longer = (tree_match - known_match).reshape(sources, rows)
        for row in range(rows):
            source = int(np.argmax(known[:, row]))
            depth = int(known[source, row])
            grown = accepted[source, row, : num[source, row]]  # past the tree's nodes: 0
            small = grown[min(TREE_NODES, grown.size) - 1] if grown.size else 0
            reach = np.flatnonzero(grown >= depth)
            needed = int(reach[0]) + 1 if reach.size else UNREACHED
            self.records.append((depth, int(small), needed, int(longer[source, row] > 0)))


def summarise(records: np.ndarray, probe_nodes: int) -> dict[str, float]:
    """The shares and percentiles the module doc names, over ``records`` [rows, 4]."""
    short = records[:, 0] > records[:, 1]
    needed = records[short, 2]
    reached = needed[needed != UNREACHED]
    longer = records[short, 3][needed == UNREACHED]
    return {
        "rows": len(records),
        "mean_ceiling_depth": float(records[:, 0].mean()) if len(records) else 0.0,
        f"mean_depth_{TREE_NODES}_nodes": float(records[:, 1].mean()) if len(records) else 0.0,
        f"share_{TREE_NODES}_nodes_short_of_ceiling": float(short.mean()) if len(records) else 0.0,
        "of_those_share_beyond_64_nodes": float(
            ((needed == UNREACHED) | (needed > 64)).mean() if needed.size else 0.0
        ),
        f"of_those_share_beyond_{probe_nodes}_nodes": float(
            (needed == UNREACHED).mean() if needed.size else 0.0
        ),
        "of_those_reached_median_nodes": float(np.median(reached)) if reached.size else 0.0,
        f"of_those_beyond_{probe_nodes}_share_below_a_shorter_match": float(
            longer.mean() if longer.size else 0.0
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout trace")
    parser.add_argument(
        "--cost",
        default="h100",
        help=f"step cost model: 'cpu' or a measured table ({', '.join(TABLE_PROFILES)})",
    )
    parser.add_argument(
        "--max-nodes", type=int, default=1024, help="the largest tree searched (default 1024)"
    )
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.max_nodes < TREE_NODES:
        parser.error(f"--max-nodes {args.max_nodes} must be >= {TREE_NODES}")
    cost = script_args.cost_model(parser, args.cost)
    steps = script_args.trace_steps(parser, args.trace, min_steps=2)
    plan = policy_cost_model(cost)
    linear = methods.build_drafter("das_cost_model", plan, 16)
    probe = BranchRankProbe(
        linear.config,
        policy=linear.policy,
        cost=plan,
        probe_nodes=args.max_nodes,
        first_step=min(steps),
    )
    view = TraceView(probe)
    for step in sorted(steps):
        view.set_step(steps[step])
        replay_step(step, steps[step], view, cost)
    summary = summarise(np.array(probe.records, np.int64).reshape(-1, 4), args.max_nodes)
    for key, value in summary.items():
        logger.info("%-40s %s", key, round(value, 3))
    write_json_atomically(
        {
            "command": f"python scripts/bench_tree_branch_rank.py --trace {args.trace.name} "
            f"--cost {args.cost} --max-nodes {args.max_nodes} --json {args.json.name}",
            "cost_model": args.cost,
            "tree_nodes": TREE_NODES,
            "max_nodes": args.max_nodes,
            "steps_after_the_first": summary,
        },
        args.json,
    )
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
