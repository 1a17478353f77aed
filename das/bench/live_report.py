"""Tables, JSON and a PNG for live rollout comparisons (:mod:`das.bench.live`)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from das.bench.live import COMPARED_METHODS, LiveWorkload, MethodRun, summarize


def compare_steps_for(workload: LiveWorkload) -> list[int]:
    """Steps 2.. (0-based 1..): step 1 has no history for any method to draft from."""
    return list(range(1, workload.num_steps)) or [0]


def build_report(
    runs: dict[str, MethodRun], workload: LiveWorkload, command: str
) -> dict[str, Any]:
    """The benchmark's JSON: per method and step, plus a summary over steps 2.. against none."""
    compare = compare_steps_for(workload)
    summary = summarize(runs, compare)
    identities = [
        entry["identity"]["identical"]
        for entry in summary.values()
        if entry.get("identity") and entry["identity"]["identical"] is not None
    ]
    return {
        "command": command,
        "workload": asdict(workload),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_write": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        # Compared methods only. Diagnostic engines (none_repeat, the A/A
        # control; spec_idle) are kept apart; the summary covers both.
        "methods": {name: run.to_dict() for name, run in runs.items() if name in COMPARED_METHODS},
        "diagnostics": {
            name: run.to_dict() for name, run in runs.items() if name not in COMPARED_METHODS
        },
        "summary": summary,
        # Greedy identity probe (temperature 0, after the measured steps) against ``none``.
        "greedy_identical": all(identities) if identities else None,
        "greedy_identity_note": (
            None
            if workload.dtype == "float32"
            else f"probe ran in {workload.dtype}: vLLM's greedy decoding is not batch-invariant "
            "outside float32 (a step verifying several tokens computes in other shapes), so "
            "compare with vLLM's own ngram/suffix rows; float32 identity is tested in "
            "tests/test_vllm_das_slow.py"
        ),
    }


def format_table(runs: dict[str, MethodRun], workload: LiveWorkload) -> str:
    """Per-step wall time, iterations, tokens/s and accepted length; then steps 2.. vs none."""
    lines = [
        f"{'method':<11} {'step':>4} {'wall s':>8} {'iters':>6} {'tokens':>7} {'tok/s':>7} "
        f"{'acc len':>7} {'drafted':>8} {'mean len':>8} {'trunc':>6} {'probe s':>7}"
    ]
    for name, run in runs.items():
        for s in run.steps:
            lines.append(
                f"{name:<11} {s.step + 1:>4} {s.wall_s:>8.1f} {s.decode_iterations:>6} "
                f"{s.output_tokens:>7} {s.output_tokens / s.wall_s:>7.0f} "
                f"{s.mean_accepted_len:>7.2f} {s.draft_tokens:>8} {s.mean_response_len:>8.0f} "
                f"{s.share_truncated:>6.0%} {s.machine_probe_s or float('nan'):>7.3f}"
            )
        if run.error:
            lines.append(f"{name:<11} FAILED: {run.error}")
    compare = compare_steps_for(workload)
    summary = summarize(runs, compare)
    lines.append("")
    lines.append(f"steps {compare[0] + 1}-{compare[-1] + 1} against none:")
    for name, entry in summary.items():
        if not entry.get("complete"):
            lines.append(f"  {name:<11} incomplete")
            continue
        speedup = entry.get("speedup_vs_none")
        iterations = entry.get("iterations_vs_none")
        identity = entry.get("identity") or {}
        lines.append(
            f"  {name:<11} {entry['wall_s']:8.1f} s"
            + (f"  speedup {speedup:5.2f}x" if speedup else "")
            + (f"  iterations {iterations:5.2f}x" if iterations else "")
            + (
                f"  greedy probe identical {identity['num_identical']}/{identity['num_sequences']}"
                if identity
                else ""
            )
        )
    adjusted = {
        name: entry["per_step_wall_vs_none_at_equal_machine_speed"]
        for name, entry in summary.items()
        if name != "none" and any(entry.get("per_step_wall_vs_none_at_equal_machine_speed") or [])
    }
    if adjusted:
        lines.append("")
        lines.append("per step, time against none's at equal machine speed (wall / probe):")
        for name, ratios in adjusted.items():
            cells = " ".join("   -" if r is None else f"{r:.2f}" for r in ratios)
            lines.append(f"  {name:<11} {cells}")
    lines.extend(format_breakdowns(summary))
    return "\n".join(lines)


BREAKDOWN_PARTS = (
    ("iterations_s", "iters"),
    ("rejected_drafts_s", "rejected"),
    ("draft_overhead_s", "draft ovh"),
    ("verify_requests_s", "verify req"),
    ("propose_s", "propose"),
    ("text_length_s", "text len"),
    ("residual_s", "residual"),
)


def format_breakdowns(summary: dict[str, Any]) -> list[str]:
    """Per DAS method and step: its wall time minus none's, split by cause (seconds)."""
    lines: list[str] = []
    for name, entry in summary.items():
        rows = entry.get("time_breakdown_vs_none")
        if not rows:
            continue
        lines.append("")
        lines.append(
            f"{name}: wall time minus none's, by cause (s; priced with the engine's own fit)"
        )
        lines.append(
            f"  {'step':>4} {'delta':>7} " + " ".join(f"{label:>9}" for _, label in BREAKDOWN_PARTS)
        )
        for row in rows:
            lines.append(
                f"  {row['step'] + 1:>4} {row['wall_delta_s']:>7.1f} "
                + " ".join(f"{row[key]:>9.1f}" for key, _ in BREAKDOWN_PARTS)
            )
    return lines


def plot_live(runs: dict[str, MethodRun], path: str | os.PathLike[str], title: str) -> Path:
    """PNG: per-step wall time and engine iterations, one bar per method (Agg, no display)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(figure)
    panels = (("wall_s", "wall time per step (s)"), ("decode_iterations", "engine iterations"))
    names = [name for name, run in runs.items() if run.steps]
    num_steps = max((len(runs[name].steps) for name in names), default=0)
    width = 0.8 / max(len(names), 1)
    for panel, (attribute, label) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, panel)
        for position, name in enumerate(names):
            steps: Sequence[Any] = runs[name].steps
            x = np.arange(len(steps)) + position * width
            axes.bar(x, [getattr(s, attribute) for s in steps], width=width, label=name)
        axes.set_xticks(np.arange(num_steps) + 0.4 - width / 2)
        axes.set_xticklabels([f"step {i + 1}" for i in range(num_steps)])
        axes.set_ylabel(label)
        if panel == 1:
            axes.legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path)
    return path
