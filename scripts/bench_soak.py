"""Soak: does DAS's memory follow its history budget over thousands of RL steps?

An RL dataset of ``N`` distinct prompts is sampled without replacement, ``B`` prompts per step
and ``G`` samples per prompt, so every prompt returns once per epoch. Each step drives the
:class:`das.drafter.DASDrafter` and the prompt-affine router (:mod:`das.verl.router`) as an
engine would: ``begin_step``, one router acquire and ``start_request`` per sample, decoding
shortcut to ``--chunks`` rounds of ``propose`` (the whole running batch) then ``extend_many``
(each request's next slice of its response), then ``finish_request`` and router release.

Responses are recorded ones (``--trace``): each sample takes a random response of the trace
prompt its dataset prompt is mapped to (dataset prompt ``p`` -> trace prompt ``p mod T``), with
every token id shifted by a per-prompt offset so that dataset prompts differ while a prompt's
samples and epochs resemble each other, as in RL.

Per step it records ``memory_bytes`` = the forest's allocated arrays
(:meth:`SuffixForest.memory`) + the Python-side maps (``python_bytes``: history tables, drafter
maps and stats, the forest's id maps, measured by :func:`deep_sizeof`) + the router's
prompt -> replica map (``router_bytes``, same method), the process RSS, the drafter's wall time
and the history's token counts; it checks the forest's integrity every ``--integrity-every``
steps and at the end. Then it checks (``checks`` in the JSON):

* the history budget filled within the first quarter of the steps;
* memory at the last step within 10% of memory at the middle step (1,000 vs 2,000 by default);
* memory never above ``bound_bytes`` = (history budget + global budget) x ``--bytes-per-token``
  + ``fixed_overhead_bytes`` (the running requests' tokens at the same rate, a router
  allowance of ``ROUTER_BYTES_PER_PROMPT`` per prompt its map can hold, ``BASE_OVERHEAD_BYTES``);
* the Python-side tables' peak in the last quarter within ``PYTHON_MAPS_TOLERANCE`` of their
  peak in the second quarter, and no forest tree beyond the history's prompts and the global
  tree at any step's end;
* the median drafter time of the last 200 steps within ``--flat-tolerance`` of the first 200;
* zero integrity errors, no drafter failure, and drafts made.

The router's map holds one entry per prompt routed, up to its ``max_prompts``
(``--router-max-prompts``, least recently routed evicted first): it is measured and allowed for
per prompt it can hold (``min(N, max_prompts)``), not per step. RSS is recorded and its
middle-to-last ratio reported, but not checked (it includes the allocator's free lists and the
imported libraries).

Full run (about 14 minutes on 2 idle cores)::

    python scripts/bench_soak.py --json benchmarks/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from das.config import HISTORY_BYTES_PER_TOKEN, DASConfig
from das.drafter import DASDrafter
from rollouts.trace import read_trace

logger = logging.getLogger("bench_soak")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT / "tests" / "data" / "trace_small.parquet"
# Allocated forest capacity per budgeted token: arrays grow by doubling, so right after a
# doubling they hold twice HISTORY_BYTES_PER_TOKEN (measured at fill) per stored token.
DEFAULT_BYTES_PER_TOKEN = 2 * HISTORY_BYTES_PER_TOKEN
ROUTER_BYTES_PER_PROMPT = 256  # one map entry + its key string (soak_cpu.json: 81, a dict)
BASE_OVERHEAD_BYTES = 4 << 20  # initial forest arrays, drafter and history objects
NUM_REPLICAS = 4
# Python-side maps follow the history's prompt count, which varies a little from step to step.
PYTHON_MAPS_TOLERANCE = 0.25


@dataclass(frozen=True)
class SoakSettings:
    """One soak run's workload and budgets."""

    num_prompts: int = 20_000
    prompts_per_step: int = 24
    samples_per_prompt: int = 4
    num_steps: int = 2_000
    chunks: int = 4
    max_history_tokens: int = 200_000
    max_global_tokens: int = 50_000
    integrity_every: int = 250
    time_window: int = 200
    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN
    flat_tolerance: float = 0.25
    use_router: bool = True
    router_max_prompts: int = 65_536  # das.verl.router.DEFAULT_MAX_PROMPTS
    seed: int = 0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if (
                item.name != "seed"
                and item.type == "int"
                and (isinstance(value, bool) or value <= 0)
            ):
                raise ValueError(f"{item.name}={value!r} must be a positive integer")
        if self.prompts_per_step > self.num_prompts:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} must be <= num_prompts="
                f"{self.num_prompts}"
            )
        if not self.flat_tolerance > 0:
            raise ValueError(f"flat_tolerance={self.flat_tolerance!r} must be > 0")


# ------------------------------------------------------------------------------- measuring
def deep_sizeof(roots: Iterable[Any], seen: set[int] | None = None) -> int:
    """Bytes of ``roots`` and everything they reach, each object once (``sys.getsizeof``).

    Follows dict keys and values, list/tuple/set/deque items and dataclass fields (slots or
    ``__dict__``); numpy arrays count ``sys.getsizeof`` (their buffer when they own it). Objects
    already in ``seen`` (shared between roots) are not counted again.
    """
    seen = set() if seen is None else seen
    total = 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            stack.extend(obj)
        elif is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name) for f in fields(obj))
    return total


def python_roots(drafter: DASDrafter) -> list[Any]:
    """The drafter's, its history's and its forest's Python-side tables (not numpy arrays)."""
    history, forest = drafter.history, drafter.forest
    return [
        history._prompts,
        history._global,
        history._holds,
        history._touched,
        drafter._class_of,
        drafter._mean_length_of,
        drafter._requests,
        drafter.stats,
        drafter.calibration,
        forest._slot_of,
        forest._tree_of_seq,
        forest._root_of,
        forest._seqs_in_tree,
        forest._free_slots,
    ]


# ------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class TracePrompt:
    """One recorded prompt: its tokens and its recorded responses with their finish reasons."""

    prompt_tokens: np.ndarray
    responses: tuple[np.ndarray, ...]
    finish_reasons: tuple[str, ...]


def load_trace_prompts(path: Path) -> tuple[list[TracePrompt], int]:
    """Recorded prompts of ``path`` (in key order) and the vocabulary span of their tokens."""
    by_key: dict[str, list] = {}
    for record in read_trace(path):
        if record.num_response_tokens:
            by_key.setdefault(record.prompt_key, []).append(record)
    if not by_key:
        raise ValueError(f"trace={str(path)!r} holds no non-empty response")
    prompts = [
        TracePrompt(
            np.asarray(records[0].prompt_tokens, np.int64),
            tuple(np.asarray(r.response_tokens, np.int64) for r in records),
            tuple(r.finish_reason for r in records),
        )
        for _, records in sorted(by_key.items())
    ]
    vocab = 1 + max(
        int(max(p.prompt_tokens.max(), *(r.max() for r in p.responses))) for p in prompts
    )
    return prompts, vocab


def step_prompts(settings: SoakSettings) -> Callable[[int], np.ndarray]:
    """Dataset prompt ids of step ``s`` (1-based): epochs are fresh permutations, read in
    order ``prompts_per_step`` at a time (a step may span two epochs)."""
    rng = np.random.default_rng(settings.seed)
    order: list[int] = []

    def prompts_of(step: int) -> np.ndarray:
        end = step * settings.prompts_per_step
        while len(order) < end:
            order.extend(rng.permutation(settings.num_prompts).tolist())
        return np.asarray(order[end - settings.prompts_per_step : end])

    return prompts_of


# ------------------------------------------------------------------------------- the soak
class _Clock:
    """Wall time spent inside the drafter."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def build_router(num_replicas: int, max_prompts: int) -> tuple[Any, str]:
    """The prompt-affine load balancer over ``num_replicas`` placeholder replicas, keeping at
    most ``max_prompts`` prompts, and the sampling ``extra_args`` name it reads prompt keys
    from (both need verl)."""
    from das.verl.agent_loop import PROMPT_KEY_ARG
    from das.verl.router import PromptAffineLoadBalancer

    replicas = {f"replica-{i}": f"handle-{i}" for i in range(num_replicas)}
    return PromptAffineLoadBalancer(replicas, {"max_prompts": max_prompts}), PROMPT_KEY_ARG


def run_soak(
    settings: SoakSettings,
    trace: Path = DEFAULT_TRACE,
    drafter_factory: Callable[[DASConfig], DASDrafter] = DASDrafter,
) -> dict:
    """Run the soak; returns the report (``steps`` rows, ``checks``, ``integrity_errors``)."""
    trace_prompts, vocab = load_trace_prompts(trace)
    config = DASConfig(
        max_history_tokens=settings.max_history_tokens,
        max_global_tokens=settings.max_global_tokens,
        max_prompt_tokens=min(DASConfig.max_prompt_tokens, settings.max_history_tokens),
    )
    drafter = drafter_factory(config)
    router, key_arg = (
        build_router(NUM_REPLICAS, settings.router_max_prompts)
        if settings.use_router
        else (None, "")
    )
    prompts_of = step_prompts(settings)
    rng = np.random.default_rng(settings.seed + 1)
    process = psutil.Process()
    rows: list[dict] = []
    integrity_errors: list[dict] = []
    max_in_flight = 0

    def check(step: int) -> None:
        try:
            drafter.forest.check_integrity()
        except AssertionError as error:
            integrity_errors.append({"step": step, "error": str(error)})

    started = time.perf_counter()
    for step in range(1, settings.num_steps + 1):
        clock = _Clock()
        clock(drafter.begin_step, step)
        requests = []  # (request id, tokens, finish reason, replica)
        in_flight = 0  # tokens of running requests in the forest: own prompt + response, live
        for prompt_id in prompts_of(step).tolist():
            base = trace_prompts[prompt_id % len(trace_prompts)]
            offset = (prompt_id * 7919) % vocab
            key = f"prompt-{prompt_id}"
            prompt_tokens = (base.prompt_tokens + offset) % vocab
            for sample in range(settings.samples_per_prompt):
                index = int(rng.integers(len(base.responses)))
                response = (base.responses[index] + offset) % vocab
                request_id = f"{step}-{prompt_id}-{sample}"
                replica = None
                if router is not None:
                    replica, _ = router.acquire_server(
                        request_id, prompt_tokens, {"extra_args": {key_arg: key}}
                    )
                clock(drafter.start_request, request_id, prompt_tokens, prompt_key=key)
                requests.append((request_id, response, base.finish_reasons[index], replica))
                in_flight += prompt_tokens.size + 2 * response.size
        max_in_flight = max(max_in_flight, in_flight)
        for chunk in range(settings.chunks):
            ids, pieces = [], []
            for request_id, response, _, _ in requests:
                size = math.ceil(len(response) / settings.chunks)
                piece = response[chunk * size : (chunk + 1) * size]
                if piece.size:
                    ids.append(request_id)
                    pieces.append(piece)
            if ids:
                clock(drafter.propose, ids)
                clock(drafter.extend_many, ids, pieces)
        for request_id, _, reason, replica in requests:
            clock(drafter.finish_request, request_id, reason)
            if router is not None:
                router.release_server(replica, request_id)
        forest_memory = drafter.forest.memory()
        forest_bytes = forest_memory.total
        seen: set[int] = set()
        python_bytes = deep_sizeof(python_roots(drafter), seen)
        router_bytes = 0 if router is None else deep_sizeof([router._server_of_prompt], seen)
        counts = drafter.stats.by_step.get(step, {})
        rows.append(
            {
                "step": step,
                "memory_bytes": forest_bytes + python_bytes + router_bytes,
                "forest_bytes": forest_bytes,
                "forest_node_bytes": forest_memory.nodes,
                "forest_edge_bytes": forest_memory.edges,
                "forest_token_bytes": forest_memory.tokens,
                "forest_live_nodes": forest_memory.num_live_nodes,
                "python_bytes": python_bytes,
                "router_bytes": router_bytes,
                "rss_bytes": process.memory_info().rss,
                "drafter_s": round(clock.seconds, 6),
                "history_tokens": drafter.history.num_stored_tokens,
                "history_prompt_tokens": drafter.history.num_prompt_tokens,
                "history_prompts": len(drafter.history._prompts),
                "forest_trees": drafter.forest.num_trees,
                "router_prompts": 0 if router is None else router.num_prompts,
                "draft_tokens": counts.get("draft_tokens", 0),
                "accepted_tokens": counts.get("accepted", 0),
            }
        )
        if step % settings.integrity_every == 0 or step == settings.num_steps:
            check(step)
        if step % 100 == 0:
            logger.info(
                "step %d: %.1f MiB, drafter %.1f ms, %d history tokens (%.0f s)",
                step,
                rows[-1]["memory_bytes"] / 2**20,
                1e3 * clock.seconds,
                rows[-1]["history_tokens"],
                time.perf_counter() - started,
            )
    report = {
        "settings": asdict(settings),
        "trace": _relative(trace),
        "das_config": config.to_dict(),
        "num_replicas": NUM_REPLICAS if router is not None else 0,
        "wall_s": time.perf_counter() - started,
        "max_in_flight_tokens": max_in_flight,
        "integrity_errors": integrity_errors,
        "num_drafter_failures": drafter.stats.num_failures,
        "num_draft_tokens": drafter.stats.num_draft_tokens,
        "num_accepted_tokens": drafter.stats.num_accepted_tokens,
        "steps": rows,
    }
    report.update(summarize(settings, rows, integrity_errors, max_in_flight))
    # propose() turns a drafter failure into empty drafts: a soak that drafted nothing passes
    # nothing.
    report["checks"]["drafter_never_failed"] = drafter.stats.num_failures == 0
    report["checks"]["drafted_tokens"] = drafter.stats.num_draft_tokens > 0
    report["passed"] = all(report["checks"].values())
    return report


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


# ------------------------------------------------------------------------------- checks
def summarize(
    settings: SoakSettings, rows: list[dict], integrity_errors: list, max_in_flight: int
) -> dict:
    """The soak's bound, memory ratio, drafter-time trend and pass/fail checks."""
    budget_tokens = settings.max_history_tokens + settings.max_global_tokens
    router_allowance = (
        min(settings.num_prompts, settings.router_max_prompts) * ROUTER_BYTES_PER_PROMPT
        if settings.use_router
        else 0
    )
    fixed_overhead = (
        max_in_flight * settings.bytes_per_token + router_allowance + BASE_OVERHEAD_BYTES
    )
    bound = budget_tokens * settings.bytes_per_token + fixed_overhead
    memory = np.array([row["memory_bytes"] for row in rows], dtype=np.int64)
    times = np.array([row["drafter_s"] for row in rows])
    fill_step = next(
        (
            row["step"]
            for row in rows
            if row["history_prompt_tokens"] > 0.9 * settings.max_history_tokens
        ),
        None,
    )
    middle, last = len(rows) // 2, len(rows)
    quarter = max(1, len(rows) // 4)
    python_bytes = np.array([row["python_bytes"] for row in rows], dtype=np.int64)
    python_ratio = float(python_bytes[-quarter:].max() / python_bytes[quarter:middle].max())
    # At a step's end no request runs: the forest holds the global tree and one tree per
    # prompt with history, nothing else.
    extra_trees = max(row["forest_trees"] - row["history_prompts"] for row in rows)
    ratio = float(memory[last - 1] / memory[middle - 1])
    rss_ratio = rows[last - 1]["rss_bytes"] / rows[middle - 1]["rss_bytes"]
    window = min(settings.time_window, len(rows) // 4) or 1
    first_median = float(np.median(times[:window]))
    last_median = float(np.median(times[-window:]))
    time_ratio = last_median / first_median
    checks = {
        "budget_filled_before_quarter": fill_step is not None and fill_step < rows[quarter]["step"],
        "memory_last_within_10pct_of_middle": abs(ratio - 1) <= 0.10,
        "python_maps_flat": python_ratio <= 1 + PYTHON_MAPS_TOLERANCE,
        "no_trees_beyond_history": extra_trees <= 1,
        "memory_never_above_bound": bool(memory.max() <= bound),
        "drafter_time_flat": abs(time_ratio - 1) <= settings.flat_tolerance,
        "zero_integrity_errors": not integrity_errors,
    }
    return {
        "budget_tokens": budget_tokens,
        "bytes_per_token": settings.bytes_per_token,
        "fixed_overhead_bytes": fixed_overhead,
        "fixed_overhead_parts": {
            "in_flight_tokens_x_bytes_per_token": max_in_flight * settings.bytes_per_token,
            "router_allowance": router_allowance,
            "base": BASE_OVERHEAD_BYTES,
        },
        "bound_bytes": bound,
        "max_memory_bytes": int(memory.max()),
        "budget_fill_step": fill_step,
        "memory_ratio": {
            "step_a": rows[middle - 1]["step"],
            "step_b": rows[last - 1]["step"],
            "memory_a": int(memory[middle - 1]),
            "memory_b": int(memory[last - 1]),
            "ratio": ratio,
            "rss_ratio": rss_ratio,
        },
        "python_maps": {
            "last_quarter_max_over_second_quarter_max": python_ratio,
            "tolerance": PYTHON_MAPS_TOLERANCE,
        },
        "max_trees_beyond_history_prompts": extra_trees,
        "drafter_time": {
            "window_steps": window,
            "first_median_s": first_median,
            "last_median_s": last_median,
            "last_over_first": time_ratio,
            "flat_tolerance": settings.flat_tolerance,
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


# ------------------------------------------------------------------------------- output
def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["steps"]
    steps = np.array([row["step"] for row in rows])
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name in ("memory_bytes", "forest_bytes"):
        top.plot(steps, [row[name] / 2**20 for row in rows], label=name)
    top.axhline(report["bound_bytes"] / 2**20, color="red", linestyle="--", label="bound")
    if report["budget_fill_step"] is not None:
        for axis in (top, middle):
            axis.axvline(report["budget_fill_step"], color="gray", linestyle=":")
    top.set_ylim(bottom=0)
    top.set_ylabel("MiB")
    top.legend(fontsize=8, loc="lower right")
    top.set_title("DAS soak: measured memory (dotted: history budget full)")
    middle.plot(steps, [row["rss_bytes"] / 2**20 for row in rows], color="green")
    middle.set_ylabel("process RSS, MiB")
    times = np.array([1e3 * row["drafter_s"] for row in rows])
    bottom.plot(steps, times, linewidth=0.4, color="lightgray", label="per step")
    width = max(1, min(50, len(times) // 10))
    rolling = [np.median(times[max(0, i - width + 1) : i + 1]) for i in range(len(times))]
    bottom.plot(steps, rolling, label=f"median of last {width}")
    bottom.set_ylabel("drafter ms per step")
    bottom.set_xlabel("RL step")
    bottom.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def to_json(report: dict) -> str:
    """The report as JSON, one line per step row."""
    head = json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=1)
    rows = ",\n".join("  " + json.dumps(row) for row in report["steps"])
    return head[:-2] + ',\n "steps": [\n' + rows + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakSettings()
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="recorded trace")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts)
    parser.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    parser.add_argument("--steps", type=int, default=defaults.num_steps)
    parser.add_argument("--chunks", type=int, default=defaults.chunks, help="extend rounds")
    parser.add_argument("--max-history-tokens", type=int, default=defaults.max_history_tokens)
    parser.add_argument("--max-global-tokens", type=int, default=defaults.max_global_tokens)
    parser.add_argument("--integrity-every", type=int, default=defaults.integrity_every)
    parser.add_argument("--time-window", type=int, default=defaults.time_window)
    parser.add_argument("--bytes-per-token", type=int, default=defaults.bytes_per_token)
    parser.add_argument("--flat-tolerance", type=float, default=defaults.flat_tolerance)
    parser.add_argument("--no-router", action="store_true", help="leave the router out")
    parser.add_argument(
        "--router-max-prompts",
        type=int,
        default=defaults.router_max_prompts,
        help="the router's max_prompts (prompt -> replica entries kept)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", type=Path, default=None, help="JSON to write (PNG beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.trace.exists():
        parser.error(f"--trace={args.trace} does not exist")
    settings = SoakSettings(
        num_prompts=args.num_prompts,
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.samples_per_prompt,
        num_steps=args.steps,
        chunks=args.chunks,
        max_history_tokens=args.max_history_tokens,
        max_global_tokens=args.max_global_tokens,
        integrity_every=args.integrity_every,
        time_window=args.time_window,
        bytes_per_token=args.bytes_per_token,
        flat_tolerance=args.flat_tolerance,
        use_router=not args.no_router,
        router_max_prompts=args.router_max_prompts,
        seed=args.seed,
    )
    report = run_soak(settings, args.trace)
    report["command"] = "python scripts/bench_soak.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    ratio = report["memory_ratio"]
    timing = report["drafter_time"]
    print(f"steps: {len(report['steps'])}, budget full at step {report['budget_fill_step']}")
    print(
        f"memory step {ratio['step_a']}: {ratio['memory_a'] / 2**20:.2f} MiB, "
        f"step {ratio['step_b']}: {ratio['memory_b'] / 2**20:.2f} MiB, ratio {ratio['ratio']:.4f}"
    )
    print(
        f"max memory {report['max_memory_bytes'] / 2**20:.2f} MiB, "
        f"bound {report['bound_bytes'] / 2**20:.2f} MiB"
    )
    print(
        f"drafter median first {timing['window_steps']} steps {1e3 * timing['first_median_s']:.1f}"
        f" ms, last {1e3 * timing['last_median_s']:.1f} ms, ratio {timing['last_over_first']:.3f}"
    )
    print(f"integrity errors: {len(report['integrity_errors'])}")
    for name, ok in report["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(to_json(report))
        logger.info("wrote %s and %s", args.json, plot(report, args.json.with_suffix(".png")))
    return report


if __name__ == "__main__":
    main()
