"""Turn multi-sample generation files into rollout records: steps, prompt keys, token ids.

The files are read by :mod:`rollouts.import_formats`. Each file stands for one policy (a
checkpoint, a variant) and becomes one step, in the order given; a generic file whose lines carry
``step``/``checkpoint`` values becomes one step per distinct value, in increasing order. With
``samples_per_step=N`` every step is split further: the first N samples of each prompt stay in
the step, the next N go to the following one, and so on (for files holding many i.i.d. samples
of one policy, such as 100 completions per prompt).

The prompt key is a stable hash of the prompt text (:func:`prompt_key_for_text`), so the same
prompt gets the same key in every file whatever the tokenizer. The prompt is tokenized as plain
text (or through the tokenizer's chat template), the response without special tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rollouts.import_formats import GenerationFile, TextSample
from rollouts.trace import RolloutRecord

TOKENIZE_BATCH_SIZE = 256


class TextTokenizer(Protocol):
    """What the importer needs of a tokenizer (a ``transformers`` tokenizer has all of it)."""

    def __call__(self, text: list[str], add_special_tokens: bool = ...) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class StepSource:
    """Where the rollouts of one imported step came from.

    Attributes:
        step: the step in the trace (0-based).
        files: the generation files that fed it (several when steps are not per file).
        label: the files' ``step``/``checkpoint`` value for this step, if they had one.
        chunk: the chunk of ``samples_per_step`` samples per prompt, if steps were split.
    """

    step: int
    files: tuple[str, ...]
    label: int | None
    chunk: int | None


@dataclass(frozen=True)
class ImportSummary:
    """Sizes of an imported trace."""

    num_steps: int
    num_prompts: int
    num_rollouts: int
    num_prompt_tokens: int  # summed over rollouts, as stored
    num_response_tokens: int
    p50: float  # response length percentiles, tokens
    p90: float
    max: int

    def describe(self) -> str:
        """One summary line for the command line."""
        return (
            f"{self.num_steps} steps, {self.num_prompts} prompts, {self.num_rollouts} rollouts, "
            f"{self.num_response_tokens} response tokens (+{self.num_prompt_tokens} prompt); "
            f"response length p50 {self.p50:.0f}, p90 {self.p90:.0f}, max {self.max}"
        )


def prompt_key_for_text(prompt: str) -> str:
    """A stable 16-hex-digit blake2b hash of the prompt's UTF-8 text (same family as
    :func:`rollouts.trace.prompt_key_for`, which hashes token ids instead)."""
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).hexdigest()


def _file_steps(generation_file: GenerationFile) -> tuple[list[int], list[int | None]]:
    """Local step (0-based) of each sample of one file and the label of each local step."""
    samples = generation_file.samples
    first_labelled = bool(samples) and samples[0].step_label is not None
    for sample in samples:
        if (sample.step_label is not None) != first_labelled:
            raise ValueError(
                f"{generation_file.path}:{sample.line_number}: field 'step' (or 'checkpoint') "
                f"must be on every line of a file or on none (line {samples[0].line_number} "
                f"{'has' if first_labelled else 'lacks'} it)"
            )
    if not samples or samples[0].step_label is None:
        return [0] * len(samples), [None]
    labels = sorted({sample.step_label for sample in samples})
    local = {label: index for index, label in enumerate(labels)}
    return [local[sample.step_label] for sample in samples], list(labels)


def assign_steps(
    files: Sequence[GenerationFile],
    *,
    step_per_file: bool = True,
    samples_per_step: int | None = None,
) -> tuple[list[tuple[int, TextSample]], list[StepSource]]:
    """The step of every sample of ``files`` (in order) and where each step came from.

    ``step_per_file``: each file's steps follow the previous file's (the default); otherwise all
    files share steps (shards of the same generations). ``samples_per_step``: split each step
    into chunks of that many samples per prompt (see the module docstring).
    """
    if samples_per_step is not None and (
        isinstance(samples_per_step, bool)
        or not isinstance(samples_per_step, int)
        or samples_per_step <= 0
    ):
        raise ValueError(f"samples_per_step={samples_per_step!r} must be a positive integer")
    if not files:
        raise ValueError("files must not be empty: nothing to import")
    assigned: list[tuple[int, TextSample]] = []
    base_sources: dict[int, tuple[list[str], int | None]] = {}
    offset = 0
    for generation_file in files:
        local_steps, labels = _file_steps(generation_file)
        for local, sample in zip(local_steps, generation_file.samples, strict=True):
            assigned.append((offset + local, sample))
        for local, label in enumerate(labels):
            file_names, _ = base_sources.setdefault(offset + local, ([], label))
            file_names.append(str(generation_file.path))
        if step_per_file:
            offset += len(labels)
    if samples_per_step is None:
        sources = [
            StepSource(step, tuple(names), label, None)
            for step, (names, label) in sorted(base_sources.items())
        ]
        return assigned, sources
    return _split_steps(assigned, base_sources, samples_per_step)


def _split_steps(
    assigned: list[tuple[int, TextSample]],
    base_sources: dict[int, tuple[list[str], int | None]],
    samples_per_step: int,
) -> tuple[list[tuple[int, TextSample]], list[StepSource]]:
    # chunk of each sample: its position among its (base step, prompt) samples // N
    seen: Counter[tuple[int, str]] = Counter()
    chunks = []
    for base, sample in assigned:
        chunks.append(seen[(base, sample.prompt)] // samples_per_step)
        seen[(base, sample.prompt)] += 1
    num_chunks = Counter()
    for (base, _), count in seen.items():
        num_chunks[base] = max(num_chunks[base], math.ceil(count / samples_per_step))
    first_step, sources, step = {}, [], 0
    for base in sorted(base_sources):
        first_step[base] = step
        names, label = base_sources[base]
        for chunk in range(num_chunks[base]):
            sources.append(StepSource(step + chunk, tuple(names), label, chunk))
        step += num_chunks[base]
    split = [
        (first_step[base] + chunk, sample)
        for (base, sample), chunk in zip(assigned, chunks, strict=True)
    ]
    return split, sources


def _prompt_token_ids(tokenizer: TextTokenizer, prompt: str, chat_template: bool) -> list[int]:
    if not chat_template:
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise ValueError(f"chat template rendered {type(text).__name__}, expected a string")
    # The rendered text already holds the template's special tokens: add none again.
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_samples(
    assigned: Sequence[tuple[int, TextSample]],
    tokenizer: TextTokenizer,
    *,
    chat_template: bool = False,
    progress: bool = False,
) -> list[RolloutRecord]:
    """Rollout records of ``(step, sample)`` pairs, ordered by step, then input order.

    ``prompt_index`` is the prompt's first-appearance position over all samples;
    ``sample_index`` counts the prompt's samples within the step; ``wall_s`` is 0 (unknown).
    """
    from tqdm import tqdm

    order = sorted(range(len(assigned)), key=lambda position: assigned[position][0])
    prompt_tokens: dict[str, np.ndarray] = {}
    prompt_index: dict[str, int] = {}
    for _, sample in assigned:
        if sample.prompt not in prompt_index:
            prompt_index[sample.prompt] = len(prompt_index)
            prompt_tokens[sample.prompt] = np.asarray(
                _prompt_token_ids(tokenizer, sample.prompt, chat_template), dtype=np.int32
            )
    keys = {prompt: prompt_key_for_text(prompt) for prompt in prompt_index}
    if len(set(keys.values())) < len(keys):
        raise ValueError("two different prompt texts hash to the same prompt key")
    records: list[RolloutRecord] = []
    sample_counts: Counter[tuple[int, str]] = Counter()
    with tqdm(total=len(order), unit="rollout", desc="tokenize", disable=not progress) as bar:
        for start in range(0, len(order), TOKENIZE_BATCH_SIZE):
            batch = [assigned[position] for position in order[start : start + TOKENIZE_BATCH_SIZE]]
            encoded = tokenizer([sample.response for _, sample in batch], add_special_tokens=False)
            for (step, sample), response_ids in zip(batch, encoded["input_ids"], strict=True):
                records.append(
                    RolloutRecord(
                        prompt_key=keys[sample.prompt],
                        step=step,
                        sample_index=sample_counts[(step, sample.prompt)],
                        prompt_tokens=prompt_tokens[sample.prompt],
                        response_tokens=np.asarray(response_ids, dtype=np.int32),
                        finish_reason=sample.finish_reason,
                        prompt_index=prompt_index[sample.prompt],
                        wall_s=0.0,
                    )
                )
                sample_counts[(step, sample.prompt)] += 1
            bar.update(len(batch))
    return records


def summarize_import(records: Sequence[RolloutRecord]) -> ImportSummary:
    """Steps, prompts, rollouts, tokens and response length percentiles of ``records``."""
    if not records:
        raise ValueError("summarize_import needs at least one record")
    lengths = np.array([record.num_response_tokens for record in records], dtype=np.int64)
    return ImportSummary(
        num_steps=len({record.step for record in records}),
        num_prompts=len({record.prompt_key for record in records}),
        num_rollouts=len(records),
        num_prompt_tokens=sum(record.num_prompt_tokens for record in records),
        num_response_tokens=int(lengths.sum()),
        p50=float(np.percentile(lengths, 50)),
        p90=float(np.percentile(lengths, 90)),
        max=int(lengths.max()),
    )
