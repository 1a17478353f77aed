"""The arguments that the trace benchmarks in ``scripts/`` share, checked with errors that name
the flag: the trace to replay, grouped into its steps, and a cost model by name or spec."""

from __future__ import annotations

import argparse
from pathlib import Path

from policies.profiles import CostModel, load_cost_model
from rollouts.trace import RolloutRecord, group_by_step, read_trace


def trace_steps(
    parser: argparse.ArgumentParser, path: Path, min_steps: int = 1, hint: str = ""
) -> dict[int, list[RolloutRecord]]:
    """The rollouts of the trace at ``path`` grouped by step; exits through ``parser.error``
    if the file does not exist (``hint`` says how to get one) or holds fewer than
    ``min_steps`` steps."""
    if not path.is_file():
        parser.error(f"--trace {path} does not exist{hint}")
    steps = group_by_step(read_trace(path))
    if len(steps) < min_steps:
        parser.error(f"--trace {path} has {len(steps)} step(s); this needs >= {min_steps}")
    return steps


def cost_model(parser: argparse.ArgumentParser, spec: str, flag: str = "--cost") -> CostModel:
    """The cost model ``spec`` names (see ``policies.profiles.load_cost_model``); exits through
    ``parser.error``, naming ``flag``, if it names none."""
    try:
        return load_cost_model(spec)
    except ValueError as error:
        parser.error(f"{flag} {spec!r}: {error}")
