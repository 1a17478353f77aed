"""Replay a trace as if the dataset were ``E`` times larger than one step's prompts.

A recorded trace usually samples the same prompts at every step, so a prompt comes back at the
very next step. In a real run the dataset is much larger than a step's batch and a prompt comes
back once per epoch, many steps later. :func:`spread_steps` stretches a trace to that shape:
each recorded step's prompts are split into ``E`` groups (by prompt key, the same split at every
step), and replay step ``s`` is group ``s mod E`` of recorded step ``s div E``. A prompt then
returns every ``E`` steps, its ``k``-th appearance is its rollouts from recorded step ``k``, and
every replay step holds its prompts' whole sibling groups (all samples of a prompt together).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from rollouts.trace import RolloutRecord


def prompt_groups(prompt_keys: Sequence[str], num_groups: int) -> dict[str, int]:
    """Group of each prompt key: keys sorted, then dealt round-robin (deterministic, balanced)."""
    return {key: rank % num_groups for rank, key in enumerate(sorted(set(prompt_keys)))}


def spread_steps(
    steps: Mapping[int, Sequence[RolloutRecord]], dataset_steps: int
) -> dict[int, list[RolloutRecord]]:
    """``{step: records}`` replayed with a prompt returning every ``dataset_steps`` steps.

    Recorded steps are taken in increasing order; the ``k``-th one becomes replay steps
    ``k * E`` to ``k * E + E - 1``, and every record's ``step`` is rewritten to its replay step.
    Replay steps with no records (a group whose prompts a recorded step lacks) are left out.
    ``E = 1`` returns the steps renumbered ``0, 1, ...`` and otherwise unchanged.

    Raises:
        ValueError: ``dataset_steps`` is not an integer >= 1, or exceeds the number of distinct
            prompts of some recorded step (a replay step would be empty).
    """
    num_groups = dataset_steps
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"dataset_steps={dataset_steps!r} must be an integer >= 1")
    for step, records in steps.items():
        num_prompts = len({r.prompt_key for r in records})
        if num_groups > num_prompts:
            raise ValueError(
                f"dataset_steps={dataset_steps} must be <= the {num_prompts} prompts of step {step}"
            )
    # One split for the whole trace, so that a prompt stays in its group at every step.
    group_of = prompt_groups(
        [r.prompt_key for records in steps.values() for r in records], num_groups
    )
    spread: dict[int, list[RolloutRecord]] = {}
    for index, step in enumerate(sorted(steps)):
        for record in steps[step]:
            replay_step = index * num_groups + group_of[record.prompt_key]
            spread.setdefault(replay_step, []).append(dataclasses.replace(record, step=replay_step))
    return {step: spread[step] for step in sorted(spread)}
