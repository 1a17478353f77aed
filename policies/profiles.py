"""Named step cost models, fitted from measured step times.

Every table named here ships in ``policies/data/`` (this project's own measurements).

Whole-step tables (the default GPU curve). ``h100`` (= ``h100_qwen25_7b``) is the measured time
of whole decode/verify steps of a Qwen2.5-7B-shaped model on one H100
(``h100_qwen25_7b_step.json``, see :mod:`policies.cost_table`), corrected to fused elementwise
kernels; ``h100_qwen25_7b_unfused`` is the table as measured. ``h100_qwen3_8b_step`` (and
``..._unfused``) is the same for a Qwen3-8B-shaped model (``h100_qwen3_8b_step.json``).
:func:`load_cost_model` returns the table model itself (anything with ``times(shapes)``).
:func:`load_profile` must return a :class:`~policies.cost_model.StepCostModel` for the budget
policy: for a table name it returns the roofline fitted to that table (:func:`fit_step_table`;
``scripts/measure_gpu_step_cost.py fit`` writes its error on every cell to
``benchmarks/results/gpu_step_cost_fit.json``).

GEMM profiles (``h100_7b``, ``h100_qwen3_8b``, ``h100_1.5b``) come from
``h100_qwen_shapes.json`` (``$DAS_COSTS_DIR`` overrides its folder): per-layer GEMM times and
LM-head times keyed by tokens per step, measured on one H100 in bf16 for the layer shapes of
Qwen models. A decode step of ``T`` tokens costs ``num_layers * layer_gemm_ms[T] +
lm_head_ms[T]`` in its linear layers; that curve is fitted with
:func:`~policies.cost_model.fit_step_cost` (relative errors: the policy compares ratios of step
times, so a 5% error on a 6 ms step matters as much as one on a 100 ms step).

Attention. The README of the data calls its SDPA attention column an upper bound, because SDPA
switches to a slow kernel as soon as a request verifies more than one token. The rows with no
draft (``k == 0``, one query token per request) do not have that problem: there the time per
layer is ``a0 + s * B * L`` with ``s`` at the HBM roofline (Qwen2.5-7B: 6.7e-7 ms per KV token
and layer = 2 KiB of K/V per token read at 3.1 TB/s; Qwen3-8B: 4 KiB at the same rate). A
flash-decoding kernel verifying ``1 + k`` query tokens reads each request's KV cache once, so
to first order its cost does not grow with ``k``. The profile therefore adds
``c_ctx = num_layers * s`` per KV-cache token read (``context_tokens``, the sum of the running
requests' context lengths) and ``num_layers * a0`` to ``c_base``, both fitted on the ``k == 0``
rows only. Pass ``include_attention=False`` for the GEMM-only curve.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

from policies._checks import check_int
from policies.cost_model import StepCostModel, fit_step_cost, parse_cost_spec
from policies.cost_table import StepCostTable, load_step_table, packaged_table_path
from policies.step_shapes import StepShapes

__all__ = [
    "PROFILE_NAMES",
    "TABLE_PROFILES",
    "CostModel",
    "costs_dir",
    "describe_cost_model",
    "fit_measured_steps",
    "fit_step_table",
    "h100_profile",
    "load_cost_model",
    "load_profile",
    "policy_cost_model",
    "step_table",
]

H100_SHAPES_FILE = "h100_qwen_shapes.json"

# name -> (shape key in h100_qwen_shapes.json, number of decoder layers)
_H100_PROFILES: dict[str, tuple[str, int]] = {
    "h100_7b": ("qwen2.5-7b", 28),
    "h100_qwen3_8b": ("qwen3-8b", 36),
    "h100_1.5b": ("qwen2.5-1.5b", 28),
}
# name -> (packaged whole-step table, fused-kernel correction)
TABLE_PROFILES: dict[str, tuple[str, bool]] = {
    "h100": ("h100_qwen25_7b_step.json", True),
    "h100_qwen25_7b": ("h100_qwen25_7b_step.json", True),
    "h100_qwen25_7b_unfused": ("h100_qwen25_7b_step.json", False),
    "h100_qwen3_8b_step": ("h100_qwen3_8b_step.json", True),
    "h100_qwen3_8b_step_unfused": ("h100_qwen3_8b_step.json", False),
}
PROFILE_NAMES: tuple[str, ...] = tuple(TABLE_PROFILES) + tuple(_H100_PROFILES)

# This project's measurement of vLLM's step cost on its 2-core CPU machine
# (scripts/measure_step_cost.py; a copy of benchmarks/results/step_cost_cpu.json).
MEASURED_CPU_PROFILE = packaged_table_path("step_cost_cpu.json")


def costs_dir() -> Path:
    """Folder of ``h100_qwen_shapes.json``: ``$DAS_COSTS_DIR`` if set, else ``policies/data``."""
    override = os.environ.get("DAS_COSTS_DIR")
    if override:
        return Path(override)
    return packaged_table_path(H100_SHAPES_FILE).parent


def _load_h100_shapes(directory: Path) -> dict:
    path = directory / H100_SHAPES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; set DAS_COSTS_DIR to the folder holding {H100_SHAPES_FILE}"
        )
    with path.open() as handle:
        return json.load(handle)


def _attention_terms(
    steps: list[dict], num_layers: int, context_len: int | None
) -> tuple[float, float]:
    """(seconds per step independent of context, seconds per KV token) from ``k == 0`` rows."""
    rows = [
        row for row in steps if row["k"] == 0 and (context_len is None or row["L"] == context_len)
    ]
    if len(rows) < 2:
        lengths = sorted({row["L"] for row in steps})
        raise ValueError(
            f"context_len={context_len!r} has fewer than 2 no-draft rows; measured: {lengths}"
        )
    kv_tokens = np.array([row["B"] * row["L"] for row in rows], dtype=np.float64)
    per_layer_ms = np.array([row["attn_ms_per_layer"] for row in rows], dtype=np.float64)
    # Attention of B requests, one query each: a0 + s * B * L (non-negative, relative errors).
    line = fit_step_cost(kv_tokens, per_layer_ms, linear_only=True, weights=per_layer_ms**-2.0)
    return num_layers * line.c_base / 1e3, num_layers * line.c_tok / 1e3


@functools.lru_cache(maxsize=32)
def _h100_profile_cached(
    directory: str, shape: str, num_layers: int, context_len: int | None, include_attention: bool
) -> StepCostModel:
    shapes = _load_h100_shapes(Path(directory))["shapes"]
    if shape not in shapes:
        raise ValueError(f"shape={shape!r} is not measured; measured shapes: {sorted(shapes)}")
    table = shapes[shape]
    gemm, lm_head = table["layer_gemm_ms"], table["lm_head_ms"]
    num_tokens = np.array(sorted(int(key) for key in gemm if key in lm_head), dtype=np.float64)
    step_s = (
        np.array([num_layers * gemm[str(int(t))] + lm_head[str(int(t))] for t in num_tokens]) / 1e3
    )
    linear_part = fit_step_cost(num_tokens, step_s, weights=step_s**-2.0)
    if not include_attention:
        return linear_part
    attention_base_s, attention_per_token_s = _attention_terms(
        table["steps"], num_layers, context_len
    )
    return StepCostModel(
        c_base=linear_part.c_base + attention_base_s,
        c_tok=linear_part.c_tok,
        knee_tokens=linear_part.knee_tokens,
        c_ctx=attention_per_token_s,
    )


def h100_profile(
    shape: str = "qwen2.5-7b",
    num_layers: int = 28,
    context_len: int | None = None,
    include_attention: bool = True,
) -> StepCostModel:
    """Step cost model (seconds) of one H100 for a measured Qwen layer shape.

    Args:
        shape: a shape key of ``h100_qwen_shapes.json`` ("qwen2.5-7b", "qwen3-8b",
            "qwen2.5-1.5b").
        num_layers: decoder layers of the model (28 for Qwen2.5-7B, 36 for Qwen3-8B).
        context_len: fit the attention term on the rows measured at this context length
            (2048 or 8192); ``None`` (default, the better fit) uses all of them. The fitted
            ``c_ctx`` is per KV token, so callers pass the step's actual ``context_tokens``.
        include_attention: add the attention term (see the module docstring).

    Raises:
        FileNotFoundError: when ``$DAS_COSTS_DIR`` names a folder without the costs file.
        ValueError: for an unmeasured shape or context length.
    """
    check_int(num_layers, "num_layers", minimum=1)
    if context_len is not None:
        check_int(context_len, "context_len", minimum=1)
    return _h100_profile_cached(
        str(costs_dir()), shape, int(num_layers), context_len, bool(include_attention)
    )


def fit_measured_steps(measurements: dict, source: str = "measurements") -> StepCostModel:
    """Fit a model to ``{"num_tokens": [...], "step_s": [...]}`` measured elsewhere.

    Optional keys: ``"context_tokens"`` (KV tokens read per step) and ``"linear_only"``.
    Relative errors are fitted, as for the H100 profiles. ``source`` names the data in errors.
    """
    try:
        num_tokens = measurements["num_tokens"]
        step_s = np.asarray(measurements["step_s"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{source} must hold lists 'num_tokens' and 'step_s' (seconds): {error}"
        ) from error
    if step_s.size and step_s.min() <= 0:
        raise ValueError(f"{source}: step_s must be > 0, got {step_s.min()!r}")
    return fit_step_cost(
        num_tokens,
        step_s,
        context_tokens=measurements.get("context_tokens"),
        linear_only=bool(measurements.get("linear_only", False)),
        weights=step_s**-2.0 if step_s.size else None,
    )


@functools.lru_cache(maxsize=8)
def step_table(name: str) -> StepCostTable:
    """The whole-step table model of a name in :data:`TABLE_PROFILES`."""
    if name not in TABLE_PROFILES:
        raise ValueError(f"name={name!r} is not a step table; known: {sorted(TABLE_PROFILES)}")
    file_name, fused = TABLE_PROFILES[name]
    return load_step_table(file_name, fused=fused)


def table_cells(table: StepCostTable) -> tuple[StepShapes, np.ndarray]:
    """The measured decode cells of ``table`` as step shapes, and their times in seconds as the
    model prices them (the fused correction applied when the table has it)."""
    measured = ~np.isnan(table.step_ms)
    batch, q, length = np.meshgrid(
        table.batch_sizes, table.query_lens, table.context_lens, indexing="ij"
    )
    batch, q, length = batch[measured], q[measured], length[measured]
    shapes = StepShapes.from_columns(
        num_tokens=(batch * q).astype(np.int64),
        draft_tokens=(batch * (q - 1)).astype(np.int64),
        num_requests=batch.astype(np.int64),
        kv_tokens=(batch * length).astype(np.int64),
        context_tokens=(batch * q * length).astype(np.int64),
    )
    return shapes, table.times(shapes)


def fit_step_table(table: StepCostTable) -> StepCostModel:
    """The :class:`StepCostModel` roofline fitted to a table's measured decode cells.

    Relative least squares over every measured cell (weights ``1 / t**2``) with ``c_ctx`` on
    ``context_tokens`` and ``c_kv`` on ``kv_tokens``; ``c_prefill`` is the slope of the
    table's prefill curve between its two largest measured token counts (compute-bound there),
    or 0 without prefill cells.
    """
    shapes, seconds = table_cells(table)
    fitted = fit_step_cost(
        shapes.num_tokens,
        seconds,
        context_tokens=shapes.context_tokens,
        kv_tokens=shapes.kv_tokens,
        weights=seconds**-2.0,
    )
    c_prefill = 0.0
    if table.prefill_tokens.size >= 2:
        tokens, ms = table.prefill_tokens[-2:], table.prefill_ms[-2:]
        c_prefill = float((ms[1] - ms[0]) / (tokens[1] - tokens[0])) / 1e3
    return dataclasses.replace(fitted, c_prefill=max(c_prefill, 0.0))


def load_cost_model(spec: str | os.PathLike[str]) -> StepCostTable | StepCostModel:
    """Any cost model with ``times(shapes)``: the table model for a name in
    :data:`TABLE_PROFILES`, ``"cpu"`` for this project's measured CPU curve
    (:data:`MEASURED_CPU_PROFILE`), else what :func:`load_profile` reads."""
    text = os.fspath(spec)
    if text == "cpu":
        text = os.fspath(MEASURED_CPU_PROFILE)
    if text in TABLE_PROFILES:
        return step_table(text)
    return load_profile(text)


def load_profile(name_or_path: str | os.PathLike[str]) -> StepCostModel:
    """A :class:`StepCostModel` from a profile name, a JSON file, or a cost spec string.

    Accepted:
        * a name in :data:`TABLE_PROFILES` ("h100", "h100_qwen25_7b", ...): the roofline fitted
          to that measured table (:func:`fit_step_table`);
        * a name of a GEMM profile ("h100_7b", "h100_qwen3_8b", "h100_1.5b");
        * a JSON file with measurements ``{"num_tokens": [...], "step_s": [...]}`` (see
          :func:`fit_measured_steps`) or with parameters ``{"c_base": ..., "c_tok": ...,
          "knee_tokens": ..., "c_ctx": ...}``;
        * a spec string ``"c_base,c_tok[,knee[,c_ctx]]"`` (see
          :func:`~policies.cost_model.parse_cost_spec`).

    Raises:
        ValueError: naming the argument when it is none of these or the file is malformed.
    """
    text = os.fspath(name_or_path)
    if text in TABLE_PROFILES:
        return policy_cost_model(step_table(text))
    if text in _H100_PROFILES:
        shape, num_layers = _H100_PROFILES[text]
        return h100_profile(shape=shape, num_layers=num_layers)
    path = Path(text)
    if path.is_file():
        try:
            with path.open() as handle:
                content = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"profile file {text!r} is not valid JSON: {error}") from error
        if not isinstance(content, dict):
            raise ValueError(f"profile file {text!r} must hold a JSON object")
        if "c_base" in content:
            try:
                return StepCostModel(**content)
            except TypeError as error:
                raise ValueError(f"profile file {text!r}: {error}") from error
        return fit_measured_steps(content, source=f"profile file {text!r}")
    if "," in text:
        return parse_cost_spec(text)
    raise ValueError(
        f"profile {text!r} is not a known name {list(PROFILE_NAMES)}, an existing JSON file, "
        "or a spec 'c_base,c_tok[,knee[,c_ctx[,...]]]'"
    )


CostModel = StepCostTable | StepCostModel  # anything with ``times(shapes)``


def policy_cost_model(cost: CostModel) -> StepCostModel:
    """The roofline a budget policy plans with for ``cost``: itself, or a table's fitted one."""
    if isinstance(cost, StepCostModel):
        return cost
    return _fitted_table(cost)


@functools.lru_cache(maxsize=8)
def _fitted_table(table: StepCostTable) -> StepCostModel:
    return fit_step_table(table)


def describe_cost_model(cost: CostModel) -> dict[str, object]:
    """What a report says of a cost model: its spec, or the table and the roofline fitted to it."""
    if isinstance(cost, StepCostModel):
        return {"kind": "roofline", "spec": cost.to_spec(), **dataclasses.asdict(cost)}
    return {
        "kind": "measured table",
        "table": repr(cost),
        "policy_roofline": policy_cost_model(cost).to_spec(),
    }
