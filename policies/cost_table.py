"""A step cost model read off a measured table of whole engine steps.

The table (``policies/data/*_step.json``, written by ``scripts/measure_gpu_step_cost.py pack``)
holds the time of one decode/verify step of a model on one GPU for a grid of

* ``B``: running requests,
* ``q``: tokens each request verifies (1 + its draft length),
* ``L``: tokens already in each request's KV cache,

plus, when measured, prefill steps (``B`` prompts of ``P`` tokens) and pairs of the same step
with unfused and fused elementwise kernels.

Decode. A step of ``num_requests = B`` requests, ``num_tokens`` tokens and ``kv_tokens`` cached
tokens is priced at ``B``, ``q = num_tokens / B``, ``L = kv_tokens / B`` (attention reads each
request's cache once, so the mean context stands for mixed contexts) by trilinear interpolation
of the step time in linear coordinates: the step is close to linear in each of ``B``, ``q`` and
``L`` between grid points (leaving a whole grid row out and predicting its cells from the rest,
``benchmarks/results/gpu_step_cost_fit.json``: median error 1.7% in linear coordinates, 15% with
weights taken in log coordinates). Past the largest ``B``, ``q`` or ``L`` the time is extrapolated
linearly in that coordinate (the step is linear in tokens and in KV tokens there); below the
smallest it is held at the edge. Cells that did not fit on the GPU are filled by extrapolating
linearly in ``L`` from the two largest measured contexts. Interpolation reproduces every cell;
it is monotone between cells because the grid is made monotone along each axis first (a cell
that measured below its smaller neighbour, by noise, is raised to it: ``num_raised_cells``).

Fused engine. The measured steps run RMSNorm, RoPE and SiLU * up as separate eager kernels; a
serving engine fuses them. With ``fused=True`` (the default) the model subtracts from every grid
cell, before the grid is made monotone, the measured saving of the fused variant (``unfused -
fused`` at the same ``B, q, L``: a curve in tokens per step, interpolated in log tokens, held
flat below its smallest and linear past its largest token count). Measured on the H100 for
Qwen2.5-7B: 0.93 ms at 1 token per step, 1.1-1.2 ms at 16-64, 1.7 ms at 256, 3.0 ms at 1024 and
6.0 ms (8%) at 2048 tokens.

Prefill. Prompt tokens prefilled in a step (``shapes.prefill_tokens``) add
``prefill(num_tokens + prefill_tokens) - prefill(num_tokens)``, where ``prefill(T)`` is the
measured time of a prefill forward of ``T`` tokens at the table's reference prompt length,
interpolated in log tokens, held flat below the smallest measured ``T`` (a small prefill rides
on the step's weight reads) and linear past the largest. A step of prefill alone costs
``prefill(prefill_tokens)``. A table without prefill cells uses its decode row at ``q = 1`` and
the shortest context as ``prefill(T)`` with ``T`` requests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from policies.step_shapes import StepShapes

__all__ = ["StepCostTable", "load_step_table", "packaged_table_path"]


def packaged_table_path(file_name: str) -> Path:
    """Path of a table shipped in ``policies/data/``."""
    return Path(str(resources.files("policies") / "data" / file_name))


def _axis_weights(grid: np.ndarray, values: np.ndarray, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and weight of each value on a sorted grid (weight 0 at grid[i], 1 at
    grid[i + 1]). Inside the grid the weight is taken in log (or linear) coordinates; below it
    the weight is 0 (held at the edge); past it the weight grows linearly in the value."""
    if grid.size == 1:
        return np.zeros(values.shape, dtype=np.int64), np.zeros(values.shape)
    index = np.clip(np.searchsorted(grid, values, side="right") - 1, 0, grid.size - 2)
    low, high = grid[index], grid[index + 1]
    clipped = np.clip(values, grid[0], grid[-1])
    weight = np.log(clipped / low) / np.log(high / low) if log else (clipped - low) / (high - low)
    beyond = values > grid[-1]
    weight = np.where(beyond, (values - low) / (high - low), weight)
    return index, weight


def _curve(grid: np.ndarray, values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Piecewise log-linear curve through (grid, values): flat below, linear past the end."""
    index, weight = _axis_weights(grid, points, log=True)
    return values[index] + weight * (values[np.minimum(index + 1, grid.size - 1)] - values[index])


def _fill_and_raise(
    step_ms: np.ndarray, batch_sizes: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """Fill missing (NaN) cells by linear extrapolation in L, then raise every cell to the
    running maximum along each axis. Returns (grid, cells filled, cells raised).

    A row (B, q) extrapolates from the slope in L of its two largest measured contexts; a row
    with a single measured context takes the slope of the row at the next smaller B (same q),
    scaled by the ratio of batch sizes (attention is linear in the requests it reads)."""
    grid = step_ms.copy()
    missing = np.isnan(grid)
    slopes = np.full(grid.shape[:2], np.nan)
    for b, q in np.ndindex(*grid.shape[:2]):  # ascending B: a smaller B's slope is known first
        row = grid[b, q]
        known = np.flatnonzero(~np.isnan(row))
        if known.size == 0 or np.any(np.flatnonzero(np.isnan(row)) < known[-1]):
            raise ValueError(
                f"table row B={batch_sizes[b]:g}, q index {q} misses a cell below L_max"
            )
        if known.size >= 2:
            low, high = known[-2], known[-1]
            slopes[b, q] = (row[high] - row[low]) / (lengths[high] - lengths[low])
        elif b > 0 and np.isfinite(slopes[b - 1, q]):
            slopes[b, q] = slopes[b - 1, q] * batch_sizes[b] / batch_sizes[b - 1]
        elif known.size < lengths.size:
            raise ValueError(f"table row B={batch_sizes[b]:g}, q index {q} has one measured L")
        high = known[-1]
        unknown = np.isnan(row)
        row[unknown] = row[high] + slopes[b, q] * (lengths[unknown] - lengths[high])
    before = grid.copy()
    for _ in range(grid.ndim + 1):  # a raise on one axis can break another; repeat to a fixpoint
        for axis in range(grid.ndim):
            grid = np.maximum.accumulate(grid, axis=axis)
    return grid, int(missing.sum()), int((grid > before).sum())


@dataclass(frozen=True, eq=False, repr=False)
class StepCostTable:
    """Step times interpolated from a measured grid; see the module docstring.

    Attributes:
        name: what the table measured (model, GPU).
        batch_sizes, query_lens, context_lens: the grid axes ``B``, ``q``, ``L`` (ascending).
        step_ms: measured decode step times, shape ``(len(B), len(q), len(L))``, NaN where the
            cell was not measured.
        prefill_tokens, prefill_ms: the prefill curve (tokens per prefill forward, ms).
        fused_tokens, fused_savings_ms: the fused-kernel saving by tokens per step (ms).
        fused: subtract the fused saving from decode steps.
    """

    name: str
    batch_sizes: np.ndarray
    query_lens: np.ndarray
    context_lens: np.ndarray
    step_ms: np.ndarray
    prefill_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prefill_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fused_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fused_savings_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fused: bool = True
    log_coordinates: bool = False

    def __post_init__(self) -> None:
        axes = {}
        for name in ("batch_sizes", "query_lens", "context_lens"):
            axis = np.asarray(getattr(self, name), dtype=np.float64)
            if axis.ndim != 1 or axis.size == 0 or axis.min() < 1 or np.any(np.diff(axis) <= 0):
                raise ValueError(f"{name}={axis.tolist()} must be ascending values >= 1")
            axes[name] = axis
            object.__setattr__(self, name, axis)
        step_ms = np.asarray(self.step_ms, dtype=np.float64)
        shape = tuple(axis.size for axis in axes.values())
        if step_ms.shape != shape:
            raise ValueError(f"step_ms has shape {step_ms.shape}, the axes need {shape}")
        if np.any(step_ms[~np.isnan(step_ms)] <= 0):
            raise ValueError("step_ms must hold times > 0 (NaN for unmeasured cells)")
        object.__setattr__(self, "step_ms", step_ms)
        for tokens_name, ms_name in (
            ("prefill_tokens", "prefill_ms"),
            ("fused_tokens", "fused_savings_ms"),
        ):
            tokens = np.asarray(getattr(self, tokens_name), dtype=np.float64)
            ms = np.asarray(getattr(self, ms_name), dtype=np.float64)
            if tokens.shape != ms.shape or tokens.ndim != 1:
                raise ValueError(f"{tokens_name} and {ms_name} must be 1-D of equal length")
            if tokens.size and (tokens.min() < 1 or np.any(np.diff(tokens) <= 0)):
                raise ValueError(f"{tokens_name}={tokens.tolist()} must be ascending values >= 1")
            if ms.size and ms.min() < 0:
                raise ValueError(f"{ms_name}={ms.tolist()} must be >= 0")
            object.__setattr__(self, tokens_name, tokens)
            object.__setattr__(self, ms_name, np.maximum.accumulate(ms) if ms.size else ms)
        corrected = step_ms
        if self.fused and self.fused_tokens.size:  # the saving at each cell's tokens per step
            tokens = axes["batch_sizes"][:, None, None] * axes["query_lens"][None, :, None]
            corrected = step_ms - _curve(self.fused_tokens, self.fused_savings_ms, tokens)
        filled, num_filled, num_raised = _fill_and_raise(
            corrected, axes["batch_sizes"], axes["context_lens"]
        )
        object.__setattr__(self, "_grid_ms", filled)
        object.__setattr__(self, "num_filled_cells", num_filled)
        object.__setattr__(self, "num_raised_cells", num_raised)

    def __repr__(self) -> str:
        shape = "x".join(str(size) for size in self.step_ms.shape)
        return (
            f"StepCostTable({self.name!r}, grid {shape}, {self.prefill_tokens.size} prefill "
            f"points, fused={self.fused and bool(self.fused_tokens.size)})"
        )

    # ------------------------------------------------------------------ pricing
    def decode_ms(
        self, num_requests: ArrayLike, num_tokens: ArrayLike, kv_tokens: ArrayLike
    ) -> np.ndarray:
        """Milliseconds of decode steps (0 for a step with no request); arguments broadcast.

        Raises:
            ValueError: for negative values, ``num_tokens < num_requests`` (every request
                verifies at least one token) or tokens without requests.
        """
        requests, tokens, kv = np.broadcast_arrays(
            *(
                np.asarray(values, dtype=np.float64)
                for values in (num_requests, num_tokens, kv_tokens)
            )
        )
        for name, values in (("num_requests", requests), ("num_tokens", tokens), ("kv_tokens", kv)):
            if values.size and (not np.all(np.isfinite(values)) or values.min() < 0):
                raise ValueError(f"{name} holds {values.min()!r}, values must be finite and >= 0")
        active = requests > 0
        if np.any(tokens[active] < requests[active]):
            bad = int(np.flatnonzero(active & (tokens < requests))[0])
            raise ValueError(
                f"num_tokens={tokens.flat[bad]:g} < num_requests={requests.flat[bad]:g}: each "
                "decoding request verifies at least one token"
            )
        if np.any(tokens[~active] > 0):
            bad = int(np.flatnonzero(~active & (tokens > 0))[0])
            raise ValueError(f"num_tokens={tokens.flat[bad]:g} with num_requests=0")
        safe = np.where(active, requests, 1.0)
        ms = self._interpolate(safe, np.where(active, tokens, 1.0) / safe, kv / safe)
        return np.where(active, ms, 0.0)

    def prefill_curve_ms(self, tokens: ArrayLike) -> np.ndarray:
        """``prefill(T)`` of the module docstring, in ms."""
        points = np.maximum(np.asarray(tokens, dtype=np.float64), 1.0)
        if self.prefill_tokens.size:
            return _curve(self.prefill_tokens, self.prefill_ms, points)
        first_q, first_l = np.ones_like(points), np.full_like(points, self.context_lens[0])
        return self._interpolate(points, first_q, first_l)

    def step_ms_of(self, shapes: StepShapes) -> np.ndarray:
        """Milliseconds of each step in ``shapes``."""
        if not isinstance(shapes, StepShapes):
            raise ValueError(f"shapes={shapes!r} must be a StepShapes")
        decode = self.decode_ms(shapes.num_requests, shapes.num_tokens, shapes.kv_tokens)
        prefill = shapes.prefill_tokens.astype(np.float64)
        tokens = shapes.num_tokens.astype(np.float64)
        with_prefill = prefill > 0
        extra = np.zeros_like(decode)
        if with_prefill.any():
            total = self.prefill_curve_ms(tokens + prefill)
            alone = np.where(tokens > 0, self.prefill_curve_ms(tokens), 0.0)
            extra = np.where(with_prefill, np.maximum(total - alone, 0.0), 0.0)
        return decode + extra

    def times(self, shapes: StepShapes) -> np.ndarray:
        """Seconds of each step in ``shapes`` (the cost-model interface replays price with)."""
        return self.step_ms_of(shapes) / 1e3

    def grid_ms(self) -> np.ndarray:
        """The completed, monotone grid the model interpolates (a copy)."""
        return self._grid_ms.copy()  # type: ignore[attr-defined]

    def _interpolate(self, batch: np.ndarray, q: np.ndarray, context: np.ndarray) -> np.ndarray:
        grid = self._grid_ms  # type: ignore[attr-defined]
        weights = [
            _axis_weights(axis, values, self.log_coordinates)
            for axis, values in (
                (self.batch_sizes, batch),
                (self.query_lens, q),
                (self.context_lens, context),
            )
        ]
        result = np.zeros(np.shape(batch))
        for corner in np.ndindex(2, 2, 2):
            factor = np.ones(np.shape(batch))
            index = []
            for (segment, weight), side, axis in zip(weights, corner, grid.shape, strict=True):
                factor = factor * (weight if side else 1.0 - weight)
                index.append(np.minimum(segment + side, axis - 1))
            result = result + factor * grid[tuple(index)]
        return result

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, content: dict, name: str = "table", fused: bool = True) -> StepCostTable:
        """A table from the JSON layout ``measure_gpu_step_cost.py pack`` writes.

        Raises:
            ValueError: naming ``name`` when a key is missing or malformed.
        """
        try:
            decode = content["decode"]
            step_ms = np.array(
                [
                    [[np.nan if v is None else v for v in row] for row in plane]
                    for plane in decode["ms"]
                ],
                dtype=np.float64,
            )
            prefill = _reference_prefill(
                content.get("prefill", {}), content.get("prefill_prompt_len")
            )
            savings = np.asarray(
                content.get("fused_savings", {}).get("cells") or np.zeros((0, 2)), dtype=np.float64
            )
            if savings.size:
                savings = _mean_by_tokens(savings)
            return cls(
                name=str(content.get("what", name)),
                batch_sizes=decode["B"],
                query_lens=decode["q"],
                context_lens=decode["L"],
                step_ms=step_ms,
                prefill_tokens=prefill[:, 0],
                prefill_ms=prefill[:, 1],
                fused_tokens=savings[:, 0] if savings.size else np.zeros(0),
                fused_savings_ms=savings[:, 1] if savings.size else np.zeros(0),
                fused=fused,
            )
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"step table {name!r} is malformed: {error!r}") from error


def _mean_by_tokens(cells: np.ndarray) -> np.ndarray:
    """Rows (tokens, value) averaged over equal token counts, ascending."""
    tokens = np.unique(cells[:, 0])
    means = [cells[cells[:, 0] == t, 1].mean() for t in tokens]
    return np.column_stack([tokens, means])


def _reference_prefill(prefill: dict, prompt_len: int | None) -> np.ndarray:
    """(tokens, ms) rows of the prefill cells at the reference prompt length (default: the
    measured length closest to 512)."""
    cells = np.asarray(prefill.get("cells") or np.zeros((0, 3)), dtype=np.float64)
    if cells.size == 0:
        return np.zeros((0, 2))
    lengths = np.unique(cells[:, 1])
    reference = (
        float(prompt_len)
        if prompt_len
        else float(lengths[np.argmin(np.abs(np.log(lengths / 512)))])
    )
    rows = cells[cells[:, 1] == reference]
    if rows.size == 0:
        raise ValueError(f"prefill_prompt_len={prompt_len} is not measured: {lengths.tolist()}")
    return _mean_by_tokens(np.column_stack([rows[:, 0] * rows[:, 1], rows[:, 2]]))


def load_step_table(name_or_path: str | os.PathLike[str], fused: bool = True) -> StepCostTable:
    """A :class:`StepCostTable` from a packaged file name or a path to a packed JSON file."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if not path.is_file():
        path = packaged_table_path(text)
    if not path.is_file():
        raise ValueError(f"step table {text!r} is neither a file nor a table in policies/data")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"step table {text!r} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"step table {text!r} must hold a JSON object")
    return StepCostTable.from_dict(content, name=text, fused=fused)
