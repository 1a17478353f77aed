"""Live rollout benchmark on vLLM: no speculation, vLLM ngram, vLLM suffix, DAS fixed, DAS policy.

Two preset workloads (any ``das-rollout run`` option given after them overrides the preset):

* ``--workload rl`` (default): RL-shaped, 32 GSM8K prompts x 8 samples x 4 steps, 512 tokens,
  T=0.6: 256 concurrent requests, which makes decode compute-bound on a 2-core CPU.
  Writes ``benchmarks/results/rollout_cpu.json`` and ``.png``.
* ``--workload small``: 4 prompts x 2 samples x 4 steps (8 concurrent requests, where a step's
  cost hardly grows with its tokens). Writes ``benchmarks/results/rollout_cpu_small.json``.

Each method gets its own engine with identical settings, one after the other, or, with
``--interleave``, all started first and stepped in turn (step s on every engine before step
s + 1), which keeps the machine's drift out of the per-step ratios. The JSON is rewritten after
every step. Ratios against ``none`` (steps 2-4) are printed at the end.

The committed results came from (``none_repeat`` is a second no-speculation engine: its ratio
to ``none`` is the machine's own noise)::

    python scripts/bench_rollout.py --workload small --interleave --kv-cache-gib 1 \\
        --methods none,none_repeat,ngram,suffix,das_fixed,das_policy
    python scripts/bench_rollout.py --workload rl --interleave --kv-cache-gib 1.5 \\
        --methods none,ngram,suffix,das_fixed,das_policy
    python scripts/bench_rollout.py --workload rl --interleave --keyed --kv-cache-gib 4 \\
        --methods none,none_repeat,das_policy --json benchmarks/results/rollout_cpu_keyed_aa.json

(``rollout_cpu_before_fit.json`` is the RL command as first run, before fix 6 and the
whole-step cost fit: ``--kv-cache-gib 2 --methods none,ngram,suffix,das_policy``;
``rollout_cpu_keyed_aa_rerun.json`` is the last command again, after fix 6 of
``das.vllm.plugin`` and the verify-cost prior; ``rollout_cpu_t10_keyed_aa.json`` is it with
``--temperature 1.0``; ``rollout_cpu_keyed_aa_fit.json`` is it with the cost fit's whole-step
window; ``rollout_cpu_keyed_aa_cap16.json`` adds ``--das-option max_draft_batch=16``, and
``rollout_cpu_keyed_aa_cap16_stopped.json`` is that command stopped after two DAS steps;
``rollout_cpu_keyed_aa_skip.json`` is the keyed command again, without the cap, after keyed
verification stopped running vLLM's own pass and the drafter started skipping lookups that
cannot pay.)
Each step also records the CPU seconds of the engine's processes and of everything else, and
a machine-speed probe before and after it (``das.bench.machine_probe``): keep the machine otherwise
idle while it runs. ``scripts/plot_step_costs.py RUN.json`` shows a DAS engine's step times,
with drafts and without, by batch size.

Four engines of 2 GiB KV cache each fit a 24 GiB machine, and five of 1.5 GiB (about 20 GB in
all); four of 4 GiB did not (the kernel killed one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from das.cli import main

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PRESETS = {
    "rl": {
        "args": ["--num-prompts", "32", "--samples", "8", "--steps", "4", "--max-tokens", "512"],
        "stem": "rollout_cpu",
    },
    "small": {
        "args": ["--num-prompts", "4", "--samples", "2", "--steps", "4", "--max-tokens", "512"],
        "stem": "rollout_cpu_small",
    },
}


def build_argv(argv: list[str]) -> list[str]:
    """``das-rollout run`` arguments: the preset's, its default outputs, then the user's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--workload", choices=sorted(PRESETS), default="rl")
    known, rest = parser.parse_known_args(argv)
    preset = PRESETS[known.workload]
    outputs = []
    json_path = RESULTS / f"{preset['stem']}.json"
    if "--json" in rest:
        json_path = Path(rest[rest.index("--json") + 1])
    else:
        outputs += ["--json", str(json_path)]
    if "--plot" not in rest:  # next to the JSON, never over another run's plot
        outputs += ["--plot", str(json_path.with_suffix(".png"))]
    return ["run", "--temperature", "0.6", *preset["args"], *outputs, *rest]


if __name__ == "__main__":
    raise SystemExit(main(build_argv(sys.argv[1:])))
