"""The drafter's own time per engine step, next to what a GPU step costs at that batch size.

A speculative engine asks its proposer for drafts between one step's sampling and the next
step's launch: the drafter's time is in series with the GPU's. The replay's modelled times
price the forward passes only. This replays a trace with the vLLM-suffix-like global tree (A),
DAS's cost-model policy with lookups taken as free (B, as every other replay runs it), the
same policy timing its own lookups as a live engine's drafter does (C:
``lookup_us_per_request="auto"``, whose gate skips the lookups of batch sizes that saved less
than they took), and C with its lookups in one thread (D: ``lookup_threads=1``), one step of
each in turn (the order rotated every step). A, B and C look large batches up in
``--lookup-threads`` threads (default: the config's ``auto`` for this machine). It times the
drafter's calls of every pass (``propose`` and ``extend_many``, start and finish of requests),
and reports by band of decoding requests:

* the drafter's median and mean milliseconds per pass, and microseconds per request;
* the modelled step time of the same passes under ``--cost`` (default: the measured H100 table);
* steps 2..: each method's modelled time with and without its drafter time added in series,
  against no speculation.

The drafter's time is this machine's CPU time (name it with every figure); an H100 host's CPU
measured no faster than a 2-core VM's (docs/long-tail.md). Writes JSON and, with ``--plot``,
drafter time per pass against batch size.

    python scripts/bench_drafter_time.py --trace TRACE --json benchmarks/results/drafter_time.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from das import methods
from das.atomic_json import write_json_atomically
from das.bench import script_args
from das.bench.batch_bands import band_labels, band_of
from das.config import LOOKUP_THREADS_AUTO, DASConfig
from das.vllm.engine import cpu_description
from policies.profiles import policy_cost_model
from rollouts.replay import StepResult, replay_step

logger = logging.getLogger("bench_drafter_time")

# Each method: the drafting method it builds and the DAS config it overrides.
DRAFTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "suffix_global": ("suffix_global", {}),
    "das_cost_model": ("das_cost_model", {}),
    "das_cost_model_auto": ("das_cost_model", {"lookup_us_per_request": "auto"}),
    "das_cost_model_auto_1_thread": (
        "das_cost_model",
        {"lookup_us_per_request": "auto", "lookup_threads": 1},
    ),
}
METHODS = tuple(DRAFTERS)


class TimedDrafter:
    """Wraps a drafter and sums the wall time of its calls per pass of the replay.

    :func:`rollouts.replay.replay_step` makes one pass per iteration: it starts the admitted
    requests, asks for drafts of the decoding ones (``propose``), gives every advancing request
    its tokens (``extend_many``, once per pass) and finishes those that ended. A pass's record
    opens with its first call and closes with ``extend_many`` and the finishes after it; its
    batch size is the number of requests ``propose`` drafted for (0 in a pass that only
    prefills).
    """

    def __init__(self, drafter: Any) -> None:
        self.drafter = drafter
        self.batch_sizes: list[int] = []
        self.seconds: list[float] = []
        self.proposals: list[tuple[int, float]] = []  # (batch size, seconds) of each propose
        self._extended = True  # the last pass has had its extend_many: the next call opens one

    def _timed(self, call: Any, *args: Any) -> tuple[Any, float]:
        """``call(*args)`` and its seconds, charged to the open pass (opening one if needed)."""
        if self._extended:
            self.batch_sizes.append(0)
            self.seconds.append(0.0)
            self._extended = False
        started = time.perf_counter()
        result = call(*args)
        elapsed = time.perf_counter() - started
        self.seconds[-1] += elapsed
        return result, elapsed

    def begin_step(self, step: int | None = None) -> int:
        self.batch_sizes.clear()
        self.seconds.clear()
        self.proposals.clear()
        self._extended = True
        return self.drafter.begin_step(step)

    def start_request(self, request_id: Hashable, prompt_tokens: Any, prompt_key: Any = None):
        return self._timed(self.drafter.start_request, request_id, prompt_tokens, prompt_key)[0]

    def propose(self, request_ids: Sequence[Hashable]) -> Any:
        proposal, elapsed = self._timed(self.drafter.propose, request_ids)
        self.batch_sizes[-1] = len(request_ids)
        self.proposals.append((len(request_ids), elapsed))
        return proposal

    def extend_many(self, request_ids: Sequence[Hashable], tokens: Sequence[np.ndarray]) -> None:
        self._timed(self.drafter.extend_many, request_ids, tokens)
        self._extended = True

    def finish_request(
        self, request_id: Hashable, finish_reason: str, stop_token_ids: Iterable[int] = ()
    ) -> None:
        # Finishes follow their pass's extend_many and belong to it.
        started = time.perf_counter()
        self.drafter.finish_request(request_id, finish_reason, stop_token_ids)
        self.seconds[-1] += time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="a das-rollout trace")
    parser.add_argument("--cost", default="h100", help="step cost model (default: h100 table)")
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--plot", type=Path, help="write drafter time per pass against batch size")
    parser.add_argument(
        "--lookup-threads",
        default=LOOKUP_THREADS_AUTO,
        help="lookup threads of A, B and C (default: auto, the config's rule for this machine)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cost = script_args.cost_model(parser, args.cost)
    threads = args.lookup_threads
    try:
        threads = DASConfig(lookup_threads=int(threads) if threads.isdigit() else threads)
    except ValueError as error:
        parser.error(f"--lookup-threads {args.lookup_threads!r}: {error}")
    num_threads = threads.num_lookup_threads
    steps = script_args.trace_steps(parser, args.trace)
    plan = policy_cost_model(cost)
    drafters = {
        method: TimedDrafter(
            methods.build_drafter(name, plan, args.k, **{"lookup_threads": num_threads, **options})
        )
        for method, (name, options) in DRAFTERS.items()
    }
    none: list[StepResult] = []
    results: dict[str, list[StepResult]] = {m: [] for m in METHODS}
    passes: dict[str, dict[str, list]] = {
        m: {"sizes": [], "seconds": [], "step_s": []} for m in METHODS
    }
    for index, step in enumerate(sorted(steps)):
        records = steps[step]
        none.append(replay_step(step, records, None, cost))
        shift = index % len(METHODS)
        order = METHODS[shift:] + METHODS[:shift]  # rotated every step
        for method in order:
            timed = drafters[method]
            result = replay_step(step, records, timed, cost)
            results[method].append(result)
            if index == 0:
                continue  # the first step has no history; its drafts are not the steady state
            step_times = np.asarray(cost.times(result.shapes))
            sizes = np.asarray(timed.batch_sizes)
            if sizes.size != step_times.size:
                raise RuntimeError(
                    f"{method}, step {step}: {sizes.size} timed passes for "
                    f"{step_times.size} replayed ones"
                )
            passes[method]["sizes"].extend(sizes.tolist())
            passes[method]["seconds"].extend(timed.seconds)
            passes[method]["step_s"].extend(step_times.tolist())
    labels = band_labels()
    gate = drafters["das_cost_model_auto"].drafter.lookup_gate
    report: dict[str, Any] = {
        # Named by the trace's file name only: no path of this machine in the report.
        "command": f"python scripts/bench_drafter_time.py --trace {args.trace.name} "
        f"--cost {args.cost} --k {args.k} --lookup-threads {args.lookup_threads}",
        "trace": args.trace.name,
        "cpu": cpu_description(),
        "cost_model": args.cost,
        "num_speculative_tokens": args.k,
        "lookup_threads": num_threads,  # of A, B and C (D: 1)
        # What C's gate measured, per power-of-two band of batch sizes (the median of recent
        # lookups).
        "auto_lookup_us_per_request": gate.measured_us_by_band(),
        "auto_gated_batches": drafters["das_cost_model_auto"].drafter.stats.num_gated_batches,
        "bands": labels,
        "methods": {},
    }
    base_s = sum(r.modelled_s for r in none[1:])
    for method in METHODS:
        sizes = np.asarray(passes[method]["sizes"])
        seconds = np.asarray(passes[method]["seconds"])
        step_s = np.asarray(passes[method]["step_s"])
        bands = band_of(sizes)
        rows = {}
        for index, label in enumerate(labels):
            mask = bands == index
            if not mask.any():
                continue
            decoding = sizes[mask].sum()
            rows[label] = {
                "passes": int(mask.sum()),
                "drafter_ms_median": float(np.median(seconds[mask]) * 1e3),
                "drafter_ms_mean": float(seconds[mask].mean() * 1e3),
                "drafter_us_per_request": float(seconds[mask].sum() / max(decoding, 1) * 1e6),
                "step_ms_mean": float(step_s[mask].mean() * 1e3),
                "drafter_over_step": float(seconds[mask].sum() / step_s[mask].sum()),
            }
        modelled = sum(r.modelled_s for r in results[method][1:])
        drafter = float(seconds.sum())
        report["methods"][method] = {
            "bands": rows,
            "steps_2_on": {
                "modelled_s": modelled,
                "drafter_s": drafter,
                "time_vs_none": modelled / base_s,
                "time_with_drafter_vs_none": (modelled + drafter) / base_s,
            },
        }
        logger.info(
            "%-15s steps 2..: modelled %.2f s + drafter %.2f s; vs none %.3fx, with the drafter "
            "in series %.3fx",
            method,
            modelled,
            drafter,
            modelled / base_s,
            (modelled + drafter) / base_s,
        )
        for label, row in rows.items():
            logger.info(
                "  %-8s %6d passes: drafter %.3f ms median (%.1f us/request), step %.2f ms",
                label,
                row["passes"],
                row["drafter_ms_median"],
                row["drafter_us_per_request"],
                row["step_ms_mean"],
            )
    a, b, c, d = (report["methods"][m]["steps_2_on"]["drafter_s"] for m in METHODS)
    report["drafter_s_ratio_threads_over_one"] = c / d if d else None
    report["drafter_s_ratio_das_over_global"] = b / a if a else None
    logger.info("DAS's drafter time / the global tree's: %.2fx", b / a if a else float("nan"))
    logger.info(
        "timing its lookups (%d batches gated): DAS's drafter time %.2fx, modelled time with "
        "it in series %.3fx none (free lookups: %.3fx)",
        report["auto_gated_batches"],
        c / b if b else float("nan"),
        report["methods"][METHODS[2]]["steps_2_on"]["time_with_drafter_vs_none"],
        report["methods"][METHODS[1]]["steps_2_on"]["time_with_drafter_vs_none"],
    )
    logger.info(
        "lookups in %d thread(s): C's drafter time %.2fx D's (one thread); with it in series "
        "%.3fx none against %.3fx",
        num_threads,
        c / d if d else float("nan"),
        report["methods"][METHODS[2]]["steps_2_on"]["time_with_drafter_vs_none"],
        report["methods"][METHODS[3]]["steps_2_on"]["time_with_drafter_vs_none"],
    )
    if args.json:
        write_json_atomically(report, args.json)
        logger.info("wrote %s", args.json)
    if args.plot:
        plot(passes, args.plot, f"{args.trace.name}, {report['cpu']}, cost {args.cost}")
        logger.info("wrote %s", args.plot)
    return report


def binned_medians(sizes: np.ndarray, values: np.ndarray) -> tuple[list[float], list[float]]:
    """Medians of ``values`` in log-spaced bins of ``sizes`` (bins of at least 5 passes)."""
    edges = np.unique(np.geomspace(1, 1024, 21).astype(int))
    centers, medians = [], []
    for low, high in itertools.pairwise(edges):
        mask = (sizes >= low) & (sizes < high)
        if mask.sum() >= 5:
            centers.append(float(np.sqrt(low * high)))
            medians.append(float(np.median(values[mask])))
    return centers, medians


def plot(passes: dict[str, dict[str, list]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, data in passes.items():
        sizes, seconds = np.asarray(data["sizes"]), np.asarray(data["seconds"])
        ax.plot(*binned_medians(sizes, seconds * 1e3), marker="o", label=f"{method}: drafter")
    data = passes["das_cost_model_auto"]
    sizes, step_s = np.asarray(data["sizes"]), np.asarray(data["step_s"])
    ax.plot(*binned_medians(sizes, step_s * 1e3), "k--", label="modelled step (same passes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decoding requests in the pass")
    ax.set_ylabel("ms per pass (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
