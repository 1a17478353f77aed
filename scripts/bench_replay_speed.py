"""Replay speed: every drafting method under two cost models on a ~3M-token trace.

``das-rollout replay`` replays each method once and prices it under every cost model from the
replay's per-iteration shapes (only ``das_cost_model``, whose budgets depend on the curve, is
replayed once per cost model). This script times, in one run and one process, one replay at a
time, method by method (the two paths take turns, the order reversed every method):

* A, ``legacy``: the replay loop as it was before the engine model (one batch per step, no
  prefill, a cost call per iteration), kept here verbatim as :func:`legacy_replay_step`;
* B, ``engine``: :func:`rollouts.replay.replay_step` (``max_num_seqs`` cap, prefill, shapes).

The two model different engines, so their passes differ; the script compares wall time only.
It prints per-method seconds and the A / B ratio, then (``--jobs N``, default 2) times B as the
CLI runs it (:func:`das.bench.replay_report.compare_methods`, N worker processes) and writes
JSON::

    python scripts/bench_replay_speed.py --json benchmarks/results/replay_speed_cpu.json

Without ``--trace`` the trace is synthetic (:func:`synthetic_trace`): ``--num-prompts`` x
``--num-samples`` x ``--num-steps`` rollouts built from the responses of the committed small
trace ``tests/data/trace_small.parquet``, with repeated structure (each prompt has a template
response that its samples share in pieces) so that the drafters find matches.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from das.atomic_json import write_json_atomically
from das.bench.replay_report import COST_DEPENDENT_METHODS, compare_methods
from das.methods import METHODS, build_drafter
from das.vllm.engine import read_cpuinfo_field
from policies.cost_model import StepCostModel
from policies.profiles import load_profile
from rollouts.replay import ReplayConfig, replay_step
from rollouts.trace import RolloutRecord, group_by_step, prompt_key_for, read_trace

logger = logging.getLogger("bench_replay_speed")

SMALL_TRACE = Path(__file__).resolve().parent.parent / "tests" / "data" / "trace_small.parquet"
COSTS = ("cpu=0.066,0.0009,73", "h100_7b=h100_7b")
PATHS = ("legacy", "engine")


# ----------------------------------------------------------------------------- the trace
def synthetic_trace(
    base: Sequence[RolloutRecord],
    num_prompts: int = 64,
    num_samples: int = 8,
    num_steps: int = 4,
    mean_tokens: int = 1750,
    max_tokens: int = 4096,
    seed: int = 0,
) -> list[RolloutRecord]:
    """A multi-step trace with the structure RL rollouts have, built from ``base``'s tokens.

    Prompt ``p`` is ``base``'s prompt ``p mod n`` behind two marker tokens ``[p, p]`` (so every
    prompt key differs). It gets a template response: ``base`` responses strung together to a
    log-normal length of mean ``mean_tokens``. Each of its samples at each step walks the
    template in runs of about 60 tokens, each run either kept (80%) or replaced by a run of as
    many tokens cut from a random ``base`` response (20%), then ends at 50-120% of the template
    length; a response reaching ``max_tokens`` is cut there with finish reason ``length``.
    """
    rng = np.random.default_rng(seed)
    prompts = sorted({r.prompt_key: r.prompt_tokens for r in base}.items())
    pool = np.concatenate([r.response_tokens for r in base]).astype(np.int32)
    responses = [r.response_tokens for r in base if r.num_response_tokens > 0]
    sigma = 0.6
    records = []
    for p in range(num_prompts):
        prompt = np.concatenate([[p, p], prompts[p % len(prompts)][1]]).astype(np.int32)
        key = prompt_key_for(prompt)
        length = int(rng.lognormal(np.log(mean_tokens) - sigma**2 / 2, sigma))
        parts, total = [], 0
        while total < 2 * max_tokens:
            part = responses[rng.integers(len(responses))]
            parts.append(part)
            total += part.size
        template = np.concatenate(parts)[: max(8, min(length, max_tokens))]
        for step in range(num_steps):
            for sample in range(num_samples):
                size = int(template.size * rng.uniform(0.5, 1.2))
                pieces, start = [], 0
                while start < size:
                    run = int(rng.integers(20, 100))
                    if rng.random() < 0.8 and start < template.size:
                        pieces.append(template[start : start + run])
                    else:
                        at = int(rng.integers(0, pool.size - run))
                        pieces.append(pool[at : at + run])
                    start += run
                response = np.concatenate(pieces)[: min(size, max_tokens)]
                records.append(
                    RolloutRecord(
                        prompt_key=key,
                        step=step,
                        sample_index=sample,
                        prompt_tokens=prompt,
                        response_tokens=response,
                        finish_reason="length" if response.size >= max_tokens else "stop",
                        prompt_index=p,
                        wall_s=0.0,
                    )
                )
    return records


# ------------------------------------------------------------------ A: the replay as it was
def legacy_replay_step(step, records, drafter, cost: StepCostModel) -> dict:
    """The replay loop before the engine model (one batch, no prefill), as it was committed;
    returns its passes and the per-iteration arrays it kept."""
    num = len(records)
    lengths = np.array([r.num_response_tokens for r in records], dtype=np.int64)
    prompt_lengths = np.array([r.num_prompt_tokens for r in records], dtype=np.int64)
    width = int(lengths.max(initial=0))
    responses = np.full((num, width + 1), -1, dtype=np.int64)
    for i, record in enumerate(records):
        responses[i, : lengths[i]] = record.response_tokens
    if drafter is not None:
        drafter.begin_step(step)
        for i, record in enumerate(records):
            drafter.start_request(i, record.prompt_tokens, record.prompt_key)
    position = np.zeros(num, dtype=np.int64)
    active = np.flatnonzero(lengths > 0)
    passes = modelled = 0.0
    iteration_tokens: list[int] = []
    iteration_context: list[int] = []
    iteration_drafts: list[int] = []
    while active.size:
        num_drafted = np.zeros(active.size, dtype=np.int64)
        accepted = np.zeros(active.size, dtype=np.int64)
        if drafter is not None:
            proposal = drafter.propose(active.tolist())
            draft = proposal.drafts
            num_drafted = draft.num_tokens
            width_k = draft.tokens.shape[1]
            if width_k:
                columns = np.minimum(position[active, None] + np.arange(width_k)[None, :], width)
                truth = responses[active[:, None], columns]
                valid = np.arange(width_k)[None, :] < num_drafted[:, None]
                matches = (draft.tokens == truth) & valid
                accepted = np.cumprod(matches, axis=1).sum(axis=1)
        produced = np.minimum(accepted + 1, lengths[active] - position[active])
        iteration_tokens.append(int((1 + num_drafted).sum()))
        context = prompt_lengths[active] + position[active]
        iteration_context.append(int(((1 + num_drafted) * context).sum()))
        iteration_drafts.append(int(num_drafted.sum()))
        modelled += cost.step_time(
            iteration_tokens[-1], iteration_context[-1], iteration_drafts[-1]
        )
        passes += 1
        if drafter is not None:
            drafter.extend_many(
                active.tolist(),
                [
                    responses[row, position[row] : position[row] + n].astype(np.int32)
                    for row, n in zip(active, produced, strict=True)
                ],
            )
        position[active] += produced
        done = active[position[active] >= lengths[active]]
        if drafter is not None and done.size:
            for row in done:
                drafter.finish_request(int(row), records[row].finish_reason)
        active = active[position[active] < lengths[active]]
    return {
        "forward_passes": int(passes),
        "arrays": (
            np.array(iteration_tokens, dtype=np.int64),
            np.array(iteration_context, dtype=np.int64),
            np.array(iteration_drafts, dtype=np.int64),
        ),
    }


def run_legacy(steps, method: str, costs: dict[str, StepCostModel], k: int) -> dict[str, float]:
    """Path A for one method: replays as the CLI did, then prices every cost model."""
    totals = {}
    targets = list(costs) if method in COST_DEPENDENT_METHODS else [None]
    for target in targets:
        drafter_cost = costs[target] if target else next(iter(costs.values()))
        drafter = build_drafter(method, drafter_cost, k)
        replayed = [legacy_replay_step(s, steps[s], drafter, drafter_cost) for s in sorted(steps)]
        for name in [target] if target else costs:
            totals[name] = sum(float(costs[name].step_times(*r["arrays"]).sum()) for r in replayed)
    return totals


def run_engine(
    steps, method: str, costs: dict[str, StepCostModel], k: int, config: ReplayConfig
) -> dict[str, float]:
    """Path B for one method: the engine-model replay, priced from its shapes."""
    totals = {}
    targets = list(costs) if method in COST_DEPENDENT_METHODS else [None]
    for target in targets:
        drafter_cost = costs[target] if target else next(iter(costs.values()))
        drafter = build_drafter(method, drafter_cost, k)
        replayed = [replay_step(s, steps[s], drafter, drafter_cost, config) for s in sorted(steps)]
        for name in [target] if target else costs:
            totals[name] = sum(r.modelled_under(costs[name]).modelled_s for r in replayed)
    return totals


def timed(function: Callable[[], object]) -> tuple[dict[str, float], object]:
    """Wall seconds and CPU seconds (this process and its finished children) of a call: on a
    shared machine the CPU seconds are the figure that other work inflates least."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time()
    started = time.perf_counter_ns()
    result = function()
    wall = (time.perf_counter_ns() - started) / 1e9
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return {"wall_s": wall, "cpu_s": time.process_time() - cpu + child_cpu}, result


def cpu_name() -> str:
    """The CPU's model name, else the machine type."""
    return read_cpuinfo_field("model name") or platform.machine()


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=None, help="a trace (default: synthetic)")
    parser.add_argument("--num-prompts", type=int, default=64, help="synthetic prompts (64)")
    parser.add_argument("--num-samples", type=int, default=8, help="synthetic samples (8)")
    parser.add_argument("--num-steps", type=int, default=4, help="synthetic steps (4)")
    parser.add_argument("--mean-tokens", type=int, default=1750, help="synthetic mean (1750)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--cost", action="append", default=None, help=f"NAME=SPEC, {COSTS}")
    parser.add_argument("--k", type=int, default=16, help="num_speculative_tokens (16)")
    parser.add_argument("--max-num-seqs", type=int, default=ReplayConfig().max_num_seqs)
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="one-process runs: legacy,engine, one or none"
    )
    parser.add_argument("--jobs", type=int, default=2, help="workers for the CLI run (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"--methods {unknown} unknown; known: {METHODS}")
    paths = [p for p in args.paths.split(",") if p and p != "none"]
    if unknown := sorted(set(paths) - set(PATHS)):
        parser.error(f"--paths {unknown} unknown; known: {PATHS}")
    costs = {}
    for spec in args.cost or COSTS:
        name, _, value = spec.partition("=")
        costs[name] = load_profile(value or name)
    config = ReplayConfig(max_num_seqs=args.max_num_seqs)

    if args.trace is not None:
        if not args.trace.is_file():
            parser.error(f"--trace {args.trace} does not exist")
        records = read_trace(args.trace)
        source = str(args.trace)
    else:
        records = synthetic_trace(
            read_trace(SMALL_TRACE),
            args.num_prompts,
            args.num_samples,
            args.num_steps,
            args.mean_tokens,
        )
        source = (
            f"synthetic {args.num_prompts}x{args.num_samples}x{args.num_steps}, "
            f"mean {args.mean_tokens} from {SMALL_TRACE.name}"
        )
    steps = group_by_step(records)
    num_tokens = sum(r.num_response_tokens for r in records)
    logger.info("trace: %s, %d rollouts, %d response tokens", source, len(records), num_tokens)

    per_method: dict[str, dict] = {}
    for index, method in enumerate(methods if paths else []):
        order = paths if index % 2 == 0 else paths[::-1]
        row = {}
        for path in order:
            if path == "legacy":
                job = functools.partial(run_legacy, steps, method, costs, args.k)
            else:
                job = functools.partial(run_engine, steps, method, costs, args.k, config)
            seconds, totals = timed(job)
            row[path] = {**seconds, "modelled_s": totals}
        per_method[method] = row
        logger.info(
            "%-18s %s",
            method,
            "  ".join(
                f"{path} {row[path]['wall_s']:7.1f} s wall {row[path]['cpu_s']:7.1f} s CPU"
                for path in paths
            ),
        )
    totals = {
        path: {key: sum(per_method[m][path][key] for m in methods) for key in ("wall_s", "cpu_s")}
        for path in paths
    }
    report = {
        "command": "python scripts/bench_replay_speed.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "cpu": cpu_name(),
        "load_average_at_end": None,
        "trace": {"source": source, "num_rollouts": len(records), "response_tokens": num_tokens},
        "methods": methods,
        "cost_models": {name: cost.to_spec() for name, cost in costs.items()},
        "max_num_seqs": config.max_num_seqs,
        "one_process_wall_s": {"per_method": per_method, "total": totals},
    }
    if len(paths) == 2:
        report["legacy_over_engine"] = {
            key: totals["legacy"][key] / totals["engine"][key] for key in ("wall_s", "cpu_s")
        }
        logger.info(
            "one process, all methods: legacy %.1f s CPU, engine %.1f s CPU, ratio %.2fx "
            "(wall %.1f s / %.1f s)",
            totals["legacy"]["cpu_s"],
            totals["engine"]["cpu_s"],
            report["legacy_over_engine"]["cpu_s"],
            totals["legacy"]["wall_s"],
            totals["engine"]["wall_s"],
        )
    if args.jobs:
        seconds, _ = timed(
            lambda: compare_methods(
                records,
                methods,
                costs,
                num_speculative_tokens=args.k,
                progress=True,
                jobs=args.jobs,
                config=config,
            )
        )
        report["cli"] = {"jobs": args.jobs, **seconds}
        logger.info(
            "das-rollout replay path, %d jobs: %.1f s wall, %.1f s CPU",
            args.jobs,
            seconds["wall_s"],
            seconds["cpu_s"],
        )
    report["load_average_at_end"] = list(os.getloadavg())
    if args.json:
        write_json_atomically(report, args.json, indent=1)
        logger.info("wrote %s", args.json)
    return report


if __name__ == "__main__":
    main()
