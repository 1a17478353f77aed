"""Benchmark DAS's numba suffix tree against ArcticInference's C++ ``SuffixTree``.

Both trees get the identical workload in one process, with ``max_depth=24`` (vLLM's default),
``min_token_prob=0.1`` and no speculation-factor limit; every timed phase alternates which tree
goes first, so machine noise hits both. Reported, for ours and arctic (speedup = arctic time /
our time; rounds report their fastest, the least disturbed by other processes):

* append throughput (tokens/s): ``bulk`` (one call per sequence), ``per_token`` (the engine's
  pattern: each prompt in one call, then per step one response chunk for every sequence still
  generating, round-robin over the batch) and ``batched`` (the same steps, ours through the
  forest's ``append_many`` once per step; arctic, without a batch API, loops);
* ``replay`` / ``replay_batched``: the engine step, a speculate (budget ``--replay-budget``) on
  the last ``max_depth + 1`` tokens before each appended chunk (batched: ``speculate_many``);
* speculate latency per call (median, p99) for contexts of 16/32/64 tokens drawn from stored
  and unseen sequences, budgets 8/16/32; how often the two drafts agree, and whether each draft
  is a correct greedy walk by a brute-force n-gram oracle (so mismatches are known to be ties);
* remove throughput (tokens/s); memory per stored token; first-call latency and RSS growth,
  each in a fresh subprocess.

Workload (RL-like: many prompts, several sequences each): GSM8K questions wrapped in the
SmolLM2 chat template are the prompts; the responses of a prompt are its reference answer copied
with splices (at rate ``--divergence`` per token, 1-8 tokens taken from another problem's answer
replace 0-4 reference tokens), so siblings share long n-grams and diverge like sampled rollouts.
With ``--trace PATH`` the groups come from a recorded rollout parquet instead (columns
``prompt_key``, ``response_tokens``, optional ``prompt_tokens``). Tokenized GSM8K is cached under
``~/.cache/das/bench/``. The machine's load from other processes is measured and reported.

Usage::

    .venv/bin/python scripts/bench_suffix_tree.py --quick      # < 60 s, writes the JSON
    .venv/bin/python scripts/bench_suffix_tree.py              # full size (minutes)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from bench_suffix_tree_workload import (
    EngineStep,
    Workload,
    bulk_ops,
    compare_drafts,
    engine_ops,
    engine_steps,
    gsm8k_workload,
    prompt_ops,
    trace_workload,
)

logger = logging.getLogger("bench_suffix_tree")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file, the repository's packages still import
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "suffix_tree.json"
NO_FACTOR_LIMIT = 1e6  # arctic's max_spec_factor meaning "no limit"

perf_ns = time.perf_counter_ns


# ------------------------------------------------------------------------------------ trees
def make_trees(max_depth: int) -> dict[str, Callable[[], object]]:
    from arctic_inference.suffix_decoding._C import SuffixTree as ArcticTree

    from suffix_tree import SuffixTree

    return {"ours": lambda: SuffixTree(max_depth), "arctic": lambda: ArcticTree(max_depth)}


def extend_fn(name: str, tree) -> Callable:
    return tree.extend if name == "ours" else tree.extend_ndarray


def speculate_fn(name: str, tree, min_token_prob: float) -> Callable:
    if name == "ours":
        spec = tree.speculate
        return lambda context, budget: spec(context, budget, min_token_prob, None)
    spec = tree.speculate_ndarray
    return lambda context, budget: spec(
        context, budget, NO_FACTOR_LIMIT, 0.0, min_token_prob, False
    )


def tree_bytes(name: str, tree) -> int:
    return int(tree.memory().total) if name == "ours" else int(tree.estimate_memory())


def check_integrity(name: str, tree) -> None:
    if name == "ours":
        tree.check_integrity()
    else:
        message = tree.check_integrity()
        if message:
            raise AssertionError(f"arctic tree: {message}")


# ---------------------------------------------------------------------------------- timing
@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic GC out of a timed section (as ``timeit`` does)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def time_appends(extend: Callable, ops: list[tuple[int, np.ndarray]]) -> int:
    with gc_paused():
        start = perf_ns()
        for seq_id, tokens in ops:
            extend(seq_id, tokens)
        return perf_ns() - start


def time_replay(extend: Callable, speculate: Callable, ops: list[tuple], budget: int) -> int:
    with gc_paused():
        start = perf_ns()
        for seq_id, tokens, context in ops:
            if context is not None:
                speculate(context, budget)
            extend(seq_id, tokens)
        return perf_ns() - start


def time_removes(tree, seq_ids: list[int]) -> int:
    remove = tree.remove
    with gc_paused():
        start = perf_ns()
        for seq_id in seq_ids:
            remove(seq_id)
        return perf_ns() - start


def time_batched(
    name: str,
    tree,
    workload: Workload,
    steps: list[EngineStep],
    budget: int | None,
    min_token_prob: float,
) -> int:
    """The engine's loop, prompts first, then every step. Ours drives each step through the
    forest's batch APIs (one ``speculate_many`` + one ``append_many``); arctic, which has no batch
    API, loops over the rows. ``budget`` None: appends only."""
    prompts = prompt_ops(workload)
    with gc_paused():
        start = perf_ns()
        if name == "ours":
            for seq_id, prompt in prompts:
                tree.append(seq_id, prompt)
            handles = np.full(len(workload.sequences), -1, np.int64)
            for seq_id, _ in prompts:
                handles[seq_id] = tree.sequence_handle(seq_id)
            root = tree.tree_handle(0)
            append_many, speculate_many = tree.append_many, tree.speculate_many
            for step in steps:
                slots = handles[step.seq_ids]
                if budget is not None:
                    rows = slots.size
                    speculate_many(
                        np.full(rows, root), slots, np.full(rows, budget), min_token_prob
                    )
                append_many(slots, step.tokens, step.offsets)
        else:
            extend = tree.extend_ndarray
            for seq_id, prompt in prompts:
                extend(seq_id, prompt)
            speculate = speculate_fn(name, tree, min_token_prob)
            for step in steps:
                if budget is None:
                    for seq_id, tokens in zip(step.seq_ids.tolist(), step.chunks, strict=True):
                        extend(seq_id, tokens)
                else:
                    for seq_id, tokens, context in zip(
                        step.seq_ids.tolist(), step.chunks, step.contexts, strict=True
                    ):
                        speculate(context, budget)
                        extend(seq_id, tokens)
        return perf_ns() - start


def alternating(round_index: int) -> tuple[str, str]:
    return ("ours", "arctic") if round_index % 2 == 0 else ("arctic", "ours")


def summarize_rounds(times_ns: dict[str, list[int]], num_tokens: int) -> dict:
    out: dict = {}
    for name, times in times_ns.items():
        median = float(np.median(times)) / 1e9
        out[name] = {
            "median_s": median,
            "min_s": min(times) / 1e9,
            "rounds_s": [t / 1e9 for t in times],
            "tokens_per_s": num_tokens / (min(times) / 1e9),
            "tokens_per_s_median": num_tokens / median,
        }
    # The fastest round is the least disturbed by other processes (as timeit reports the min).
    out["speedup"] = out["arctic"]["min_s"] / out["ours"]["min_s"]
    out["speedup_median"] = out["arctic"]["median_s"] / out["ours"]["median_s"]
    return out


def bench_append_remove(
    workload: Workload, trees: dict, args: argparse.Namespace, progress
) -> tuple[dict, dict]:
    """Timed appends (bulk, per-token, replay, batched) and removes, alternating rounds."""
    from suffix_tree import SuffixForest

    steps = engine_steps(workload, args.response_chunk, args.max_depth)
    modes = {"bulk": bulk_ops(workload), "per_token": engine_ops(workload, steps, False)}
    replay = engine_ops(workload, steps, True) if args.replay else None
    order = [i for group in workload.groups for i in group]
    num_tokens = workload.num_tokens
    forests = {"ours": lambda: SuffixForest(args.max_depth), "arctic": trees["arctic"]}
    times: dict[str, dict[str, list[int]]] = {m: {"ours": [], "arctic": []} for m in modes}
    times["remove"] = {"ours": [], "arctic": []}
    batched = ["batched", "replay_batched"] if args.batched else []
    for mode in (["replay"] if replay else []) + batched:
        times[mode] = {"ours": [], "arctic": []}
    memory: dict = {}
    for round_index in progress(range(args.rounds), desc="append/remove rounds"):
        for name in alternating(round_index):
            built = {}
            for mode, ops in modes.items():
                built[mode] = trees[name]()
                times[mode][name].append(time_appends(extend_fn(name, built[mode]), ops))
            if round_index == 0:
                memory[name] = tree_bytes(name, built["bulk"])
                if name == "ours":
                    report = built["bulk"].memory()
                    memory["ours_breakdown"] = {
                        field: getattr(report, field)
                        for field in ("nodes", "edges", "tokens", "sequences", "num_live_nodes")
                    }
                if args.check:
                    check_integrity(name, built["bulk"])
                    check_integrity(name, built["per_token"])
            # The per-token tree is the one removed: its sequences grew like the engine's.
            times["remove"][name].append(time_removes(built["per_token"], order))
            if args.check and round_index == 0:
                check_integrity(name, built["per_token"])
            del built
            if replay and round_index < args.replay_rounds:
                tree = trees[name]()
                spec = speculate_fn(name, tree, args.min_token_prob)
                times["replay"][name].append(
                    time_replay(extend_fn(name, tree), spec, replay, args.replay_budget)
                )
            if args.batched:
                make, prob = forests[name], args.min_token_prob
                times["batched"][name].append(
                    time_batched(name, make(), workload, steps, None, prob)
                )
                if round_index < args.replay_rounds:
                    times["replay_batched"][name].append(
                        time_batched(name, make(), workload, steps, args.replay_budget, prob)
                    )
    results = {mode: summarize_rounds(times[mode], num_tokens) for mode in times}
    results["per_token"]["num_calls"] = len(modes["per_token"])
    results["bulk"]["num_calls"] = len(modes["bulk"])
    if replay:
        results["replay"]["num_speculate_calls"] = sum(op[2] is not None for op in replay)
        results["replay"]["budget"] = args.replay_budget
    if args.batched:
        results["batched"]["num_steps"] = len(steps)
    return results, memory


# ----------------------------------------------------------------------------- speculation
def sample_contexts(
    sequences: list[np.ndarray], prompt_lens: list[int], length: int, count: int, rng
) -> list[np.ndarray]:
    """``count`` contexts of ``length`` tokens ending inside a response (where drafting runs)."""
    eligible = [i for i, s in enumerate(sequences) if s.size > max(length, prompt_lens[i])]
    if not eligible:
        logger.warning("no sequence is long enough for %d-token contexts: cell skipped", length)
        return []
    contexts = []
    for _ in range(count):
        i = eligible[int(rng.integers(len(eligible)))]
        end = int(rng.integers(max(length, prompt_lens[i]), sequences[i].size))
        contexts.append(np.ascontiguousarray(sequences[i][end - length : end]))
    return contexts


def percentile_us(values_ns: np.ndarray, q: float) -> float:
    return float(np.percentile(values_ns, q)) / 1e3


def bench_speculate(workload: Workload, trees: dict, args: argparse.Namespace, progress) -> dict:
    built = {}
    for name in ("ours", "arctic"):
        built[name] = trees[name]()
        time_appends(extend_fn(name, built[name]), bulk_ops(workload))
    specs = {name: speculate_fn(name, built[name], args.min_token_prob) for name in built}
    rng = np.random.default_rng(args.seed + 1)
    calls = []  # (source, context_len, budget, context)
    for source, seqs, plens in (
        ("stored", workload.sequences, workload.prompt_lens),
        ("unseen", workload.unseen, workload.unseen_prompt_lens),
    ):
        for length in args.context_lens:
            for context in sample_contexts(seqs, plens, length, args.contexts_per_cell, rng):
                calls.extend((source, length, budget, context) for budget in args.budgets)
    rng.shuffle(calls)
    for _, _, budget, context in calls[: min(len(calls), 500)]:  # warm-up
        specs["ours"](context, budget)
        specs["arctic"](context, budget)
    num = len(calls)
    elapsed = {"ours": np.zeros(num, np.int64), "arctic": np.zeros(num, np.int64)}
    drafts: dict[str, list] = {"ours": [None] * num, "arctic": [None] * num}
    with gc_paused():
        for i in progress(range(num), desc="speculate", mininterval=1.0):
            _, _, budget, context = calls[i]
            for name in alternating(i):
                spec = specs[name]
                start = perf_ns()
                draft = spec(context, budget)
                elapsed[name][i] = perf_ns() - start
                drafts[name][i] = draft
    cells = []
    keys = sorted({(c[0], c[1], c[2]) for c in calls})
    for source, length, budget in keys:
        mask = np.array([(c[0], c[1], c[2]) == (source, length, budget) for c in calls])
        cell = {
            "source": source,
            "context_len": length,
            "budget": budget,
            "num_calls": int(mask.sum()),
        }
        for name in ("ours", "arctic"):
            values = elapsed[name][mask]
            cell[name] = {
                "median_us": percentile_us(values, 50),
                "p99_us": percentile_us(values, 99),
                "mean_us": float(values.mean()) / 1e3,
            }
        cell["speedup_median"] = cell["arctic"]["median_us"] / cell["ours"]["median_us"]
        cells.append(cell)
    overall = {
        name: {
            "median_us": percentile_us(elapsed[name], 50),
            "p99_us": percentile_us(elapsed[name], 99),
            "total_s": float(elapsed[name].sum()) / 1e9,
        }
        for name in elapsed
    }
    overall["speedup_total"] = overall["arctic"]["total_s"] / overall["ours"]["total_s"]
    overall["speedup_median"] = overall["arctic"]["median_us"] / overall["ours"]["median_us"]
    # Robust to preemption spikes, every (source, length, budget) cell weighs the same.
    overall["speedup_geomean_cell_medians"] = float(
        np.exp(np.mean(np.log([cell["speedup_median"] for cell in cells])))
    )
    agreement = compare_drafts(calls, drafts, workload, built["ours"], args)
    return {"cells": cells, "overall": overall, "drafts": agreement, "num_calls": num}


# ------------------------------------------------------------------- fresh-process measurements
def save_workload(workload: Workload, path: Path, context_len: int = 32) -> None:
    order = [i for group in workload.groups for i in group]
    sequences = [workload.sequences[i] for i in order]
    np.savez(
        path,
        tokens=np.concatenate(sequences),
        offsets=np.cumsum([0] + [s.size for s in sequences]).astype(np.int64),
        context=workload.unseen[0][-context_len:],
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fresh_process_worker(name: str, workload_path: str, max_depth: int, min_token_prob: float):
    """Run in a subprocess: time the first calls from a cold interpreter, then the RSS growth
    of storing the whole workload. Prints one JSON line."""
    with np.load(workload_path) as data:
        tokens, offsets, context = data["tokens"], data["offsets"], data["context"]
    sequences = [tokens[offsets[i] : offsets[i + 1]] for i in range(offsets.size - 1)]
    out = {}
    start = perf_ns()
    if name == "ours":
        from suffix_tree import SuffixTree as Tree
    else:
        from arctic_inference.suffix_decoding._C import SuffixTree as Tree
    out["import_ms"] = (perf_ns() - start) / 1e6
    start = perf_ns()
    tree = Tree(max_depth)
    out["construct_ms"] = (perf_ns() - start) / 1e6
    extend = extend_fn(name, tree)
    speculate = speculate_fn(name, tree, min_token_prob)
    start = perf_ns()
    extend(0, sequences[0])
    out["first_extend_ms"] = (perf_ns() - start) / 1e6
    start = perf_ns()
    speculate(context, 16)
    out["first_speculate_ms"] = (perf_ns() - start) / 1e6
    start = perf_ns()
    speculate(context, 16)
    out["second_speculate_ms"] = (perf_ns() - start) / 1e6
    start = perf_ns()
    tree.remove(0)
    out["first_remove_ms"] = (perf_ns() - start) / 1e6
    out["first_call_total_ms"] = sum(
        out[k] for k in ("import_ms", "construct_ms", "first_extend_ms", "first_speculate_ms")
    )
    gc.collect()
    before = rss_bytes()
    for seq_id, seq in enumerate(sequences):
        extend(seq_id, seq)
    gc.collect()
    out["rss_delta_bytes"] = rss_bytes() - before
    out["structure_bytes"] = tree_bytes(name, tree)
    out["num_tokens"] = int(tokens.size)
    print(json.dumps(out))


def bench_fresh_processes(workload: Workload, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workload.npz"
        save_workload(workload, path)
        runs: dict[str, list[dict]] = {"ours": [], "arctic": []}
        for repeat in range(args.fresh_repeats):
            for name in alternating(repeat):
                command = [sys.executable, __file__, "--worker", name]
                command += ["--worker-workload", str(path), "--max-depth", str(args.max_depth)]
                command += ["--min-token-prob", str(args.min_token_prob)]
                start = perf_ns()
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                wall_ms = (perf_ns() - start) / 1e6
                if done.returncode != 0:
                    raise RuntimeError(f"{name} worker failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["process_wall_ms"] = wall_ms
                runs[name].append(result)
    out = {}
    for name, results in runs.items():
        # Latencies: the least disturbed run (min); sizes do not vary between runs.
        out[name] = {key: float(np.min([r[key] for r in results])) for key in results[0]}
        out[name]["num_runs"] = len(results)
    out["rss_per_token"] = {
        name: out[name]["rss_delta_bytes"] / out[name]["num_tokens"] for name in runs
    }
    return out


# -------------------------------------------------------------------------------- reporting
def machine_load() -> dict:
    """Load average and the busiest other processes (a busy neighbour skews timings)."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    try:
        ps = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etimes,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
        busy = []
        for line in ps.stdout.splitlines():
            pid, pcpu, _, command = line.split(None, 3)
            if int(pid) != os.getpid() and float(pcpu) >= 5.0 and command != "ps":
                busy.append(f"{command}(pid {pid}, {pcpu}% cpu over its life)")
    except (OSError, subprocess.SubprocessError, ValueError):
        busy = ["ps unavailable"]
    return {"loadavg_1_5_15": [float(x) for x in load], "busy_processes": busy[:5]}


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process + children)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
    self_cpu = sum(os.times()[:4])
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), self_cpu


def other_cpu_share(before: tuple[float, float, float]) -> float:
    """Share of the machine's CPU time used by other processes since ``before`` (0..1)."""
    after = cpu_snapshot()
    wall = after[0] - before[0]
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


APPEND_LABELS = {
    "bulk": ("append bulk (Mtok/s)", 1e6),
    "per_token": ("append per-token (Mtok/s)", 1e6),
    "batched": ("append per-token, batch API (Mtok/s)", 1e6),
    "replay": ("replay spec+append (ktok/s)", 1e3),
    "replay_batched": ("replay, batch API (ktok/s)", 1e3),
    "remove": ("remove (Mtok/s)", 1e6),
}
FRESH_LABELS = {
    "import_ms": "import (ms)",
    "construct_ms": "construct, incl. numba load (ms)",
    "first_extend_ms": "first extend (ms)",
    "first_speculate_ms": "first speculate (ms)",
    "second_speculate_ms": "second speculate (ms)",
    "first_call_total_ms": "import..first speculate (ms)",
    "process_wall_ms": "subprocess wall (ms)",
}


def format_table(results: dict) -> str:
    row = "{:<40} {:>13} {:>13} {:>8}".format
    lines = [row("metric", "ours", "arctic", "speedup"), "-" * 77]
    for mode, (label, scale) in APPEND_LABELS.items():
        if mode in results["append"]:
            r = results["append"][mode]
            ours, arctic = r["ours"]["tokens_per_s"] / scale, r["arctic"]["tokens_per_s"] / scale
            lines.append(row(label, f"{ours:.3f}", f"{arctic:.3f}", f"{r['speedup']:.2f}x"))
    spec = results["speculate"]
    for cell in spec["cells"]:
        label = f"spec {cell['source']} ctx{cell['context_len']} k{cell['budget']} med/p99 us"
        ours = f"{cell['ours']['median_us']:.1f}/{cell['ours']['p99_us']:.1f}"
        arctic = f"{cell['arctic']['median_us']:.1f}/{cell['arctic']['p99_us']:.1f}"
        lines.append(row(label, ours, arctic, f"{cell['speedup_median']:.2f}x"))
    o = spec["overall"]
    lines.append(
        row(
            "speculate, geomean of cell medians",
            "",
            "",
            f"{o['speedup_geomean_cell_medians']:.2f}x",
        )
    )
    lines.append(
        row(
            "speculate, all calls (total ms)",
            f"{o['ours']['total_s'] * 1e3:.1f}",
            f"{o['arctic']['total_s'] * 1e3:.1f}",
            f"{o['speedup_total']:.2f}x",
        )
    )
    m = results["memory"]
    ours, arctic = m["ours_bytes_per_token"], m["arctic_bytes_per_token"]
    lines.append(row("memory (bytes/stored token)", f"{ours:.1f}", f"{arctic:.1f}", ""))
    if "fresh_process" in results:
        f = results["fresh_process"]
        ours, arctic = f["rss_per_token"]["ours"], f["rss_per_token"]["arctic"]
        lines.append(row("RSS growth (bytes/stored token)", f"{ours:.1f}", f"{arctic:.1f}", ""))
        for key, label in FRESH_LABELS.items():
            ours, arctic = f["ours"][key], f["arctic"][key]
            lines.append(row(label, f"{ours:.3f}", f"{arctic:.3f}", f"{arctic / ours:.2f}x"))
    d = spec["drafts"]
    lines += [
        "-" * 77,
        f"drafts equal: {d['equal_fraction']:.3f} raw, {d['aligned_equal_fraction']:.3f} aligned;"
        f" aligned mismatches {d['aligned_mismatch_kinds']}",
        f"oracle: {d['oracle_checked']} drafts checked, invalid {d['oracle_invalid']};"
        f" mean |score diff| {d['mean_abs_score_diff']:.4f}",
    ]
    w = results["workload"]
    lines.append(
        f"workload: {w['source']}, {w['num_prompts']} prompts, {w['num_sequences']} sequences, "
        f"{w['num_tokens']} tokens; speedup = arctic time / our time"
    )
    machine = results["machine"]
    lines.append(
        f"other processes used {machine['other_processes_cpu_share']:.0%} of the machine's CPU"
        f" during the run; load average before {machine['before']['loadavg_1_5_15']}, after "
        f"{machine['after']['loadavg_1_5_15']}; busy: "
        f"{machine['before']['busy_processes'] + machine['after']['busy_processes']}"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def portable(path: Path) -> str:
    """``path`` relative to the repository, else its file name: no machine paths in the JSON."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s in total")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--trace", type=Path, help="rollout parquet (prompt_key, response_tokens)")
    parser.add_argument("--num-prompts", type=int, help="prompt groups (quick 48, full 256)")
    parser.add_argument(
        "--seqs-per-prompt", type=int, help="sequences per group (quick 8, full 16)"
    )
    parser.add_argument("--divergence", type=float, default=0.05, help="splice rate per token")
    parser.add_argument("--rounds", type=int, help="alternating timing rounds (3)")
    parser.add_argument("--replay-rounds", type=int, help="rounds that replay (quick 1, full 2)")
    parser.add_argument("--no-replay", dest="replay", action="store_false")
    parser.add_argument(
        "--no-batched", dest="batched", action="store_false", help="skip the batch-API modes"
    )
    parser.add_argument("--replay-budget", type=int, default=16)
    parser.add_argument("--response-chunk", type=int, default=1, help="tokens per engine step")
    parser.add_argument("--contexts-per-cell", type=int, help="contexts per (source, length)")
    parser.add_argument("--context-lens", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-depth", type=int, default=24)
    parser.add_argument("--min-token-prob", type=float, default=0.1)
    parser.add_argument("--fresh-repeats", type=int, help="fresh subprocesses per tree (0: skip)")
    parser.add_argument(
        "--oracle-sample", type=float, default=0.05, help="share of agreeing drafts re-checked"
    )
    parser.add_argument("--check", action="store_true", help="check_integrity after builds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ours", "arctic"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {
        "num_prompts": 48, "seqs_per_prompt": 8, "rounds": 3, "replay_rounds": 1,
        "contexts_per_cell": 150, "fresh_repeats": 2,
    }  # fmt: skip
    full = {
        "num_prompts": 256, "seqs_per_prompt": 16, "rounds": 3, "replay_rounds": 2,
        "contexts_per_cell": 1000, "fresh_repeats": 5,
    }  # fmt: skip
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> dict:
    started = perf_ns()
    try:
        from tqdm import tqdm

        def progress(iterable, **kwargs):
            return tqdm(iterable, disable=args.quick or not sys.stderr.isatty(), **kwargs)
    except ImportError:

        def progress(iterable, **kwargs):
            return iterable

    load_before = machine_load()
    cpu_before = cpu_snapshot()
    if args.trace:
        workload = trace_workload(args.trace, args.num_prompts, args.seed)
    else:
        num_unseen = max(8, args.num_prompts // 8)
        workload = gsm8k_workload(
            args.num_prompts, args.seqs_per_prompt, num_unseen, args.divergence, args.seed
        )
    logger.info(
        "workload: %d groups, %d sequences, %d tokens (%.1fs)",
        len(workload.groups), len(workload.sequences), workload.num_tokens,
        (perf_ns() - started) / 1e9,
    )  # fmt: skip
    trees = make_trees(args.max_depth)
    for name in ("ours", "arctic"):  # warm-up: compile/load kernels, touch every operation
        tree = trees[name]()
        small = Workload(workload.groups[:2], workload.sequences, workload.prompt_lens, [], [], "")
        small_steps = engine_steps(small, args.response_chunk, args.max_depth)
        time_appends(extend_fn(name, tree), engine_ops(small, small_steps, False))
        speculate_fn(name, tree, args.min_token_prob)(workload.sequences[0][-20:], 8)
        time_removes(tree, [i for g in small.groups for i in g])
    results: dict = {
        "config": {k: (portable(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {
            "source": workload.source,
            "num_prompts": len(workload.groups),
            "num_sequences": len(workload.sequences),
            "num_tokens": workload.num_tokens,
            "mean_prompt_tokens": float(np.mean(workload.prompt_lens)),
            "mean_response_tokens": float(
                np.mean(
                    [
                        s.size - p
                        for s, p in zip(workload.sequences, workload.prompt_lens, strict=True)
                    ]
                )
            ),
            "num_unseen_sequences": len(workload.unseen),
        },
    }
    append, memory = bench_append_remove(workload, trees, args, progress)
    results["append"] = append
    logger.info("append/remove done (%.1fs)", (perf_ns() - started) / 1e9)
    results["speculate"] = bench_speculate(workload, trees, args, progress)
    logger.info("speculate done (%.1fs)", (perf_ns() - started) / 1e9)
    num_tokens = workload.num_tokens
    results["memory"] = {
        "ours_bytes": memory["ours"],
        "arctic_bytes": memory["arctic"],
        "ours_bytes_per_token": memory["ours"] / num_tokens,
        "arctic_bytes_per_token": memory["arctic"] / num_tokens,
        "memory_ratio": memory["ours"] / memory["arctic"],
        "ours_breakdown_bytes": memory["ours_breakdown"],
        "note": "ours: memory().total, allocated capacity incl. growth slack (node pool "
        "reserved for the worst case of a chunk, then doubled; edge table kept <= 60% full; "
        "per-sequence token capacity doubled); arctic: estimate_memory(), its own count of "
        "node, map and sequence storage, no allocator overhead. RSS growth (fresh_process) "
        "counts only touched pages: ours' untouched zeroed slack is not resident.",
    }
    if args.fresh_repeats > 0:
        results["fresh_process"] = bench_fresh_processes(workload, args)
        logger.info("fresh processes done (%.1fs)", (perf_ns() - started) / 1e9)
    results["append_speedup"] = append["per_token"]["speedup"]
    results["append_bulk_speedup"] = append["bulk"]["speedup"]
    results["speculate_speedup"] = results["speculate"]["overall"]["speedup_geomean_cell_medians"]
    results["remove_speedup"] = append["remove"]["speedup"]
    results["memory_ratio"] = results["memory"]["memory_ratio"]
    for mode in ("replay", "batched", "replay_batched"):
        if mode in append:
            key = "append_batched" if mode == "batched" else mode
            results[f"{key}_speedup"] = append[mode]["speedup"]
    results["definitions"] = {
        "speedup": "arctic time / our time (> 1: ours faster); for append/remove modes the "
        "fastest of the alternating rounds of each (speedup_median: medians)",
        "append_speedup": "per-token (engine pattern) append through the one-sequence API; "
        "append_bulk_speedup: one call per sequence; append_batched_speedup: ours through "
        "append_many once per step, arctic looping (it has no batch API)",
        "speculate_speedup": "geometric mean over (source, context length, budget) cells of the "
        "ratio of per-call medians; speculate.overall.speedup_total: ratio of summed times",
        "memory_ratio": "our bytes / arctic bytes after storing the workload",
    }
    results["machine"] = {
        "before": load_before,
        "after": machine_load(),
        "cpus": os.cpu_count(),
        "other_processes_cpu_share": other_cpu_share(cpu_before),
    }
    results["elapsed_s"] = (perf_ns() - started) / 1e9
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.worker:
        fresh_process_worker(args.worker, args.worker_workload, args.max_depth, args.min_token_prob)
        return
    results = run(args)
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s (%.1fs in all)", args.json, results["elapsed_s"])


if __name__ == "__main__":
    main()
