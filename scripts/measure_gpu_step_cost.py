#!/usr/bin/env python3
"""Measure the time of one engine step of a Qwen-shaped model on one GPU.

Random bf16 weights (timing only). Three kinds of cells, each one whole forward pass captured in
a CUDA graph and replayed (eager PyTorch is launch-bound and ~3x slower on small steps); the
time is the median of per-replay CUDA-event timings:

* ``decode``: B running requests verify q = 1 + k tokens each against L cached tokens:
  embedding, every decoder layer (RMSNorm, QKV, Qwen3's per-head q/k norm, RoPE, KV-cache write,
  attention, O projection, RMSNorm, SwiGLU MLP), final norm, LM head over all B * q tokens.
  Attention: SDPA for q = 1; for q > 1 FlexAttention's split-KV decoding kernel
  (``BACKEND=TRITON_DECODE``) with a bottom-right causal block mask. That kernel needs a
  power-of-two number of query heads per KV head, so a group of 7 (Qwen2.5-7B) is padded to
  8 with a zero query head whose output is dropped.
* ``prefill``: B prompts of P tokens each, no cache yet: the same layers with causal SDPA over
  the prompt, the KV-cache write, and the LM head over each prompt's last token only.
* ``variant``: ``unfused`` runs norms, RoPE and SiLU * up as separate eager kernels (as the
  published table did); ``fused`` runs each of those blocks as one ``torch.compile``-generated
  kernel, as a serving engine does. ``unfused - fused`` on the same cell is the correction
  ``policies.cost_table`` subtracts from the unfused decode table.

Output: ``$OUT/gpu_step_cost_<model>.json`` (default: the current folder), rewritten after every
cell so a run cut short keeps what it measured. ``pack`` turns such files (and the earlier
full-step table) into the compact table the package ships in ``policies/data/``.

Usage:
  python scripts/measure_gpu_step_cost.py run --model qwen25_7b --parts prefill,fused
  python scripts/measure_gpu_step_cost.py run --model qwen3_8b --parts decode,prefill,fused
  python scripts/measure_gpu_step_cost.py smoke           # tiny shapes, CPU, eager: logic check
  python scripts/measure_gpu_step_cost.py pack --decode FULL_STEP.json [--measured RUN.json]
      --out policies/data/h100_qwen25_7b_step.json
  python scripts/measure_gpu_step_cost.py fit   # roofline prior per packaged table, error on
      every cell -> benchmarks/results/gpu_step_cost_fit.json

Measured (one H100 80GB HBM3, torch 2.11 + CUDA 13, 419 s for both runs below):
  run --model qwen25_7b --parts fused,prefill        -> gpu_step_cost_h100_qwen25_7b.json
  run --model qwen3_8b --parts decode,prefill,fused  -> gpu_step_cost_h100_qwen3_8b.json
(both in benchmarks/results/).
The Qwen2.5-7B decode grid of ``policies/data/h100_qwen25_7b_step.json`` is the earlier
full-step table of this project (same method); its unfused cells re-measured here agree within
0.4% up to 64 tokens per step and 1-5% at 256-2048 tokens (this script's cells are faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

EPS = 1e-6
ROPE_THETA = 1e6


@dataclasses.dataclass(frozen=True)
class Shape:
    """Layer shapes of a decoder-only model."""

    name: str
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool
    qk_norm: bool


SHAPES = {
    "qwen25_7b": Shape("qwen25_7b", 3584, 28, 28, 4, 128, 18944, 152064, True, False),
    "qwen3_8b": Shape("qwen3_8b", 4096, 36, 32, 8, 128, 12288, 151936, False, True),
    "tiny": Shape("tiny", 224, 2, 14, 2, 16, 448, 1000, True, True),
}

DECODE_B = (1, 4, 16, 64, 256)
DECODE_K = (0, 1, 3, 7, 15)
DECODE_L = (512, 2048, 8192)
PREFILL_P = (128, 512, 2048, 8192)
PREFILL_B = (1, 4, 16, 64)
MAX_PREFILL_TOKENS = 65536
# (B, q) pairs timed unfused and fused at L = 2048: tokens per step 1 .. 2048.
FUSED_CELLS = ((1, 1), (4, 4), (64, 1), (16, 4), (32, 4), (64, 4), (128, 4), (256, 4), (512, 4))
FUSED_L = 2048


def log(*parts: object) -> None:
    print(*parts, flush=True)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


class Bench:
    """Owns the device, the weights and the timing of one model shape."""

    def __init__(self, shape: Shape, device: str, use_graph: bool, use_compile: bool) -> None:
        import torch

        self.torch = torch
        self.shape = shape
        self.device = device
        self.use_graph = use_graph
        self.use_compile = use_compile
        self.dtype = torch.bfloat16
        torch._dynamo.config.recompile_limit = 4096
        torch._dynamo.config.accumulated_recompile_limit = 1 << 20
        self.weights = self._random_weights()
        self._compiled: dict[str, object] = {}

    # ------------------------------------------------------------------ weights
    def _random_weights(self) -> dict:
        torch, s = self.torch, self.shape

        def randn(*size: int, fan_in: int | None = None):
            tensor = torch.randn(*size, dtype=self.dtype, device=self.device)
            return tensor.mul_(1.0 / math.sqrt(fan_in)) if fan_in else tensor

        qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        layers = []
        for _ in range(s.num_layers):
            layer = {
                "norm1": 1 + 0.1 * randn(s.hidden),
                "qkv": randn(qkv_rows, s.hidden, fan_in=s.hidden),
                "qkv_bias": 0.1 * randn(qkv_rows) if s.qkv_bias else None,
                "o": randn(s.hidden, s.num_heads * s.head_dim, fan_in=s.num_heads * s.head_dim),
                "norm2": 1 + 0.1 * randn(s.hidden),
                "gate_up": randn(2 * s.intermediate, s.hidden, fan_in=s.hidden),
                "down": randn(s.hidden, s.intermediate, fan_in=s.intermediate),
            }
            if s.qk_norm:
                layer["q_norm"] = 1 + 0.1 * randn(s.head_dim)
                layer["k_norm"] = 1 + 0.1 * randn(s.head_dim)
            layers.append(layer)
        return {
            "layers": layers,
            "embed": randn(s.vocab, s.hidden),
            "final_norm": 1 + 0.1 * randn(s.hidden),
            "lm_head": randn(s.vocab, s.hidden, fan_in=s.hidden),
        }

    # ------------------------------------------------------------------ elementwise blocks
    def _block(self, name: str, fused: bool):
        """The elementwise block ``name``: eager (unfused) or one compiled kernel (fused)."""
        functions = {"rms_norm": _rms_norm, "rope": _rope, "silu_mul": _silu_mul}
        if not fused or not self.use_compile:
            return functions[name]
        if name not in self._compiled:
            self._compiled[name] = self.torch.compile(functions[name], dynamic=False)
        return self._compiled[name]

    # ------------------------------------------------------------------ attention
    def _decode_attention(self, batch: int, q: int, cached: int, flex_on_cpu: bool = False):
        """attention(q [B, q, Hq, D], k_cache, v_cache [B, Hkv, L + q, D]) -> [B * q, Hq * D]."""
        torch, s = self.torch, self.shape
        import torch.nn.functional as F

        group = s.num_heads // s.num_kv_heads
        if q == 1 or (self.device != "cuda" and not flex_on_cpu):
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(q, cached + q) if q > 1 else None

            def sdpa(qh, kc, vc):
                out = F.scaled_dot_product_attention(
                    qh.transpose(1, 2), kc, vc, attn_mask=mask, enable_gqa=True
                )
                return out.transpose(1, 2).reshape(batch * q, s.num_heads * s.head_dim)

            return sdpa, "sdpa"
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        padded = next_pow2(group)

        def bottom_right_causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + cached

        block_mask = create_block_mask(
            bottom_right_causal, None, None, q, cached + q, device=self.device
        )
        rows = q * padded
        block_m = 64 if rows > 128 else min(max(next_pow2(rows), 16), 128)
        options = {
            "BLOCK_M": block_m,
            "BLOCK_N": 64,
            "num_warps": 4,
            "num_stages": 3 if block_m <= 32 else 2,
        }
        if self.device == "cuda":
            options["BACKEND"] = "TRITON_DECODE"  # the split-KV kernel, or an error: no fallback
        else:
            options = {}
        if "flex" not in self._compiled:
            self._compiled["flex"] = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        flex = self._compiled["flex"]
        query_pad = torch.zeros(
            batch, q, s.num_kv_heads, padded, s.head_dim, dtype=self.dtype, device=self.device
        )

        def flex_decode(qh, kc, vc):
            query_pad[:, :, :, :group].copy_(qh.view(batch, q, s.num_kv_heads, group, s.head_dim))
            query = query_pad.view(batch, q, s.num_kv_heads * padded, s.head_dim).transpose(1, 2)
            out = flex(
                query, kc, vc, block_mask=block_mask, enable_gqa=True, kernel_options=options
            )
            out = out.unflatten(1, (s.num_kv_heads, padded))[:, :, :group]  # B, Hkv, g, q, D
            return out.permute(0, 3, 1, 2, 4).reshape(batch * q, s.num_heads * s.head_dim)

        return flex_decode, f"flex_decode_pad{padded}"

    def _prefill_attention(self, batch: int, length: int):
        import torch.nn.functional as F

        s = self.shape

        def causal(qh, kc, vc):
            out = F.scaled_dot_product_attention(
                qh.transpose(1, 2), kc, vc, is_causal=True, enable_gqa=True
            )
            return out.transpose(1, 2).reshape(batch * length, s.num_heads * s.head_dim)

        return causal, "sdpa_causal"

    # ------------------------------------------------------------------ the step
    def make_step(self, kind: str, batch: int, q: int, cached: int, fused: bool):
        """A zero-argument callable running one step, its attention backend, and its buffers."""
        torch, s, w = self.torch, self.shape, self.weights
        tokens = batch * q
        rms_norm = self._block("rms_norm", fused)
        rope = self._block("rope", fused)
        silu_mul = self._block("silu_mul", fused)
        if kind == "decode":
            attention, backend = self._decode_attention(batch, q, cached)
        else:
            attention, backend = self._prefill_attention(batch, q)
        cache_len = cached + q
        cache_shape = (batch, s.num_kv_heads, cache_len, s.head_dim)
        caches = [  # one (K, V) pair per layer
            tuple(torch.randn(cache_shape, dtype=self.dtype, device=self.device) for _ in "kv")
            for _ in range(s.num_layers)
        ]
        inverse = 1.0 / (
            ROPE_THETA
            ** (
                torch.arange(0, s.head_dim, 2, device=self.device, dtype=torch.float32) / s.head_dim
            )
        )
        positions = torch.arange(cached, cached + q, device=self.device, dtype=torch.float32)
        angles = positions[:, None] * inverse[None, :]
        cos = angles.cos().to(self.dtype)[None, :, None, :]
        sin = angles.sin().to(self.dtype)[None, :, None, :]
        ids = torch.randint(0, s.vocab, (tokens,), device=self.device)
        num_q = s.num_heads * s.head_dim
        num_kv = s.num_kv_heads * s.head_dim

        def step():
            x = torch.nn.functional.embedding(ids, w["embed"])
            h = rms_norm(x, w["layers"][0]["norm1"])
            for index, layer in enumerate(w["layers"]):
                if index:
                    h = rms_norm(x, layer["norm1"])
                qkv = torch.nn.functional.linear(h, layer["qkv"], layer["qkv_bias"])
                qh = qkv[:, :num_q].view(batch, q, s.num_heads, s.head_dim)
                kh = qkv[:, num_q : num_q + num_kv].view(batch, q, s.num_kv_heads, s.head_dim)
                vh = qkv[:, num_q + num_kv :].view(batch, q, s.num_kv_heads, s.head_dim)
                if s.qk_norm:
                    qh = rms_norm(qh, layer["q_norm"])
                    kh = rms_norm(kh, layer["k_norm"])
                qh, kh = rope(qh, kh, cos, sin)
                k_cache, v_cache = caches[index]
                k_cache[:, :, cached:].copy_(kh.transpose(1, 2))
                v_cache[:, :, cached:].copy_(vh.transpose(1, 2))
                out = attention(qh, k_cache, v_cache)
                x = torch.addmm(x, out, layer["o"].t())
                h = rms_norm(x, layer["norm2"])
                gate_up = torch.nn.functional.linear(h, layer["gate_up"])
                x = torch.addmm(x, silu_mul(gate_up), layer["down"].t())
            if kind == "prefill":  # logits of each prompt's last token only
                x = x.view(batch, q, s.hidden)[:, -1]
            x = rms_norm(x, w["final_norm"])
            return torch.nn.functional.linear(x, w["lm_head"])

        return step, backend, caches

    # ------------------------------------------------------------------ timing
    def time_step(self, step) -> dict:
        """Median/p90 milliseconds of ``step`` (graph-replayed on CUDA) and its logits."""
        torch = self.torch
        if self.device != "cuda":
            logits = step()
            times = []
            for _ in range(3):
                started = time.perf_counter()
                step()
                times.append((time.perf_counter() - started) * 1e3)
            return {"ms": statistics.median(times), "reps": 3, "graph": False}, logits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        graph.replay()
        torch.cuda.synchronize()
        started = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        reps = 20 if time.perf_counter() - started < 0.04 else 10
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for begin, end in events:
            begin.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        times = sorted(begin.elapsed_time(end) for begin, end in events)
        result = {
            "ms": statistics.median(times),
            "ms_p90": times[max(0, math.ceil(0.9 * reps) - 1)],
            "reps": reps,
            "graph": True,
        }
        logits = logits.clone()
        del graph
        return result, logits

    def fits(self, batch: int, q: int, cached: int, kind: str) -> tuple[bool, str]:
        """Whether a cell's KV cache and activations fit in the free device memory."""
        if self.device != "cuda":
            return True, ""
        s = self.shape
        kv = s.num_layers * 2 * batch * s.num_kv_heads * (cached + q) * s.head_dim * 2
        tokens = batch * q
        logits_rows = batch if kind == "prefill" else tokens
        activations = tokens * (8 * s.intermediate + 12 * s.hidden + 8 * s.num_heads * s.head_dim)
        activations += logits_rows * s.vocab * 4
        free, _ = self.torch.cuda.mem_get_info()
        need = kv + 2 * activations + (2 << 30)
        return need < free, f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"

    def cell(self, kind: str, batch: int, q: int, cached: int, fused: bool) -> dict:
        row = {
            "kind": kind,
            "B": batch,
            "q": q,
            "L": cached,
            "tokens": batch * q,
            "variant": "fused" if fused else "unfused",
        }
        ok, why = self.fits(batch, q, cached, kind)
        if not ok:
            row["skipped"] = why
            return row
        started = time.time()
        try:
            step, backend, caches = self.make_step(kind, batch, q, cached, fused)
            timing, logits = self.time_step(step)
            row.update(timing, backend=backend, finite=bool(self.torch.isfinite(logits).all()))
            del caches, step, logits
        except Exception as error:  # a failed cell is recorded, the sweep goes on
            traceback.print_exc()
            row["error"] = repr(error)[:300]
        row["wall_s"] = round(time.time() - started, 2)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        return row


# ---------------------------------------------------------------------- eager blocks
def _rms_norm(x, weight):
    import torch

    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, EPS)


def _rope(q, k, cos, sin):
    import torch

    def rotate(t):
        half = t.shape[-1] // 2
        first, second = t[..., :half], t[..., half:]
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    return rotate(q), rotate(k)


def _silu_mul(gate_up):
    import torch

    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------- runs
def _meta(bench: Bench) -> dict:
    torch = bench.torch
    meta = {
        "torch": torch.__version__,
        "device": bench.device,
        "shape": dataclasses.asdict(bench.shape),
    }
    if bench.device == "cuda":
        meta.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
    return meta


def _dump(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(path)


def _plan(parts: list[str], decode_b, decode_k, decode_l) -> list[tuple[str, int, int, int, bool]]:
    cells = []
    for part in parts:
        if part == "prefill":
            cells += [
                ("prefill", b, p, 0, True)
                for p in PREFILL_P
                for b in PREFILL_B
                if b * p <= MAX_PREFILL_TOKENS
            ]
        elif part == "fused":
            for b, q in FUSED_CELLS:
                cells += [("decode", b, q, FUSED_L, False), ("decode", b, q, FUSED_L, True)]
        elif part == "decode":
            cells += [
                ("decode", b, 1 + k, length, False)
                for length in decode_l
                for b in decode_b
                for k in decode_k
            ]
        else:
            raise SystemExit(f"part={part!r} must be prefill, fused or decode")
    return cells


def run(args: argparse.Namespace) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    shape = SHAPES[args.model]
    deadline = time.time() + args.budget_s
    bench = Bench(shape, device, use_graph=device == "cuda", use_compile=not args.no_compile)
    path = Path(os.environ.get("OUT", ".")) / f"gpu_step_cost_{shape.name}.json"
    result = {"meta": _meta(bench), "cells": [], "not_run": []}
    log(f"{shape.name} on {device}: weights ready")
    plan = _plan(args.parts.split(","), args.decode_b, args.decode_k, args.decode_l)
    for kind, batch, q, cached, fused in plan:
        if time.time() > deadline:
            result["not_run"].append(
                {"kind": kind, "B": batch, "q": q, "L": cached, "fused": fused}
            )
            continue
        row = bench.cell(kind, batch, q, cached, fused)
        log(json.dumps(row))
        result["cells"].append(row)
        _dump(result, path)
    _dump(result, path)
    log(f"wrote {path}: {len(result['cells'])} cells, {len(result['not_run'])} not run")
    return result


def smoke(args: argparse.Namespace) -> None:
    """Tiny shapes on the CPU: every kind of cell runs, fused equals unfused."""
    import torch

    bench = Bench(SHAPES["tiny"], "cpu", use_graph=False, use_compile=not args.no_compile)
    for kind, batch, q, cached in (
        ("decode", 2, 1, 40),
        ("decode", 2, 4, 40),
        ("prefill", 2, 16, 0),
    ):
        torch.manual_seed(0)
        unfused, _, _ = bench.make_step(kind, batch, q, cached, fused=False)
        reference = unfused()
        torch.manual_seed(0)
        fused, _, _ = bench.make_step(kind, batch, q, cached, fused=True)
        out = fused()
        error = float((out.float() - reference.float()).norm() / reference.float().norm())
        cell = f"{kind} B={batch} q={q} L={cached}"
        log(f"smoke {cell}: logits {tuple(out.shape)}, rel diff {error:.2e}")
        if error > 0.05 or not torch.isfinite(out).all():
            raise SystemExit(f"smoke {kind}: fused and unfused logits differ (rel diff {error})")
    batch, q, cached, s = 2, 4, 40, bench.shape
    qh = torch.randn(batch, q, s.num_heads, s.head_dim, dtype=torch.bfloat16)
    kc = torch.randn(batch, s.num_kv_heads, cached + q, s.head_dim, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    sdpa, _ = bench._decode_attention(batch, q, cached)
    flex, name = bench._decode_attention(batch, q, cached, flex_on_cpu=True)
    reference, out = sdpa(qh, kc, vc).float(), flex(qh, kc, vc).float()
    error = float((out - reference).norm() / reference.norm())
    log(f"smoke {name} against sdpa: rel diff {error:.2e}")
    if error > 0.05:
        raise SystemExit(f"smoke: {name} differs from sdpa (rel diff {error})")
    log(json.dumps(bench.cell("decode", 2, 4, 40, fused=False)))


# ---------------------------------------------------------------------- pack
def pack(args: argparse.Namespace) -> None:
    """Write the compact table ``policies.cost_table`` reads.

    ``--decode``: a full-step JSON with ``cells`` holding ``B``, ``q``, ``L``, ``ms_median`` (the
    earlier table) or a run of this script (``kind == "decode"``, ``variant == "unfused"``).
    ``--measured``: a run of this script whose ``prefill`` cells and ``fused``/``unfused`` pairs
    go into the table.
    """
    decode_source = json.loads(Path(args.decode).read_text())
    decode = {}
    for cell in decode_source["cells"]:
        if cell.get("kind", "decode") != "decode" or cell.get("variant", "unfused") != "unfused":
            continue
        ms = cell.get("ms_median", cell.get("ms"))
        if ms is not None:
            decode[(cell["B"], cell["q"], cell["L"])] = ms
    measured = json.loads(Path(args.measured).read_text()) if args.measured else {"cells": []}
    if args.measured and decode_source is not measured:
        for cell in measured["cells"]:
            key = (cell["B"], cell["q"], cell["L"])
            if cell.get("kind") == "decode" and cell.get("variant") == "unfused" and "ms" in cell:
                decode.setdefault(key, cell["ms"])
    # Keep the grid: a B, q or L value met in a single cell (a fused-pair cell off the decode
    # grid) would make a row of missing cells.
    for axis in range(3):
        counts: dict[int, int] = {}
        for key in decode:
            counts[key[axis]] = counts.get(key[axis], 0) + 1
        decode = {key: ms for key, ms in decode.items() if counts[key[axis]] > 1}
    batches = sorted({key[0] for key in decode})
    queries = sorted({key[1] for key in decode})
    lengths = sorted({key[2] for key in decode})
    grid = [
        [[_round(decode.get((b, q, length))) for length in lengths] for q in queries]
        for b in batches
    ]
    pairs: dict[tuple[int, int, int], dict[str, float]] = {}
    prefill = []
    for cell in measured["cells"]:
        if "ms" not in cell:
            continue
        if cell["kind"] == "prefill":
            prefill.append([cell["B"], cell["q"], _round(cell["ms"])])
        else:
            pairs.setdefault((cell["B"], cell["q"], cell["L"]), {})[cell["variant"]] = cell["ms"]
    fused_savings = sorted(
        [b * q, _round(max(0.0, v["unfused"] - v["fused"]))]
        for (b, q, _), v in pairs.items()
        if {"unfused", "fused"} <= set(v)
    )
    meta = measured.get("meta") or decode_source.get("meta", {})
    table = {
        "what": args.what,
        "unit": "ms",
        "device": meta.get("gpu", "unknown"),
        "torch": meta.get("torch", "unknown"),
        "decode": {"B": batches, "q": queries, "L": lengths, "ms": grid},
        "prefill": {"columns": ["B", "prompt_len", "ms"], "cells": sorted(prefill)},
        "fused_savings": {"columns": ["tokens", "ms"], "cells": fused_savings},
    }
    _dump(table, Path(args.out))
    log(
        f"wrote {args.out}: {len(decode)} decode cells, {len(prefill)} prefill cells, "
        f"{len(fused_savings)} fused pairs"
    )


# ---------------------------------------------------------------------- fit
def _leave_one_row_out(table) -> dict:
    """Relative error of predicting each interior cell with its whole grid row (one B, q or L
    value) left out, for log and linear interpolation coordinates."""
    import numpy as np

    from policies.cost_table import StepCostTable

    axes = [table.batch_sizes, table.query_lens, table.context_lens]
    result = {}
    for log_coordinates in (True, False):
        errors = []
        for cell in np.ndindex(*table.step_ms.shape):
            measured = table.step_ms[cell]
            if np.isnan(measured) or any(
                i in (0, n - 1) for i, n in zip(cell, table.step_ms.shape, strict=True)
            ):
                continue
            for axis in range(3):
                keep = [i for i in range(axes[axis].size) if i != cell[axis]]
                reduced = list(axes)
                reduced[axis] = axes[axis][keep]
                try:
                    model = StepCostTable(
                        "leave-one-out",
                        *reduced,
                        np.take(table.step_ms, keep, axis=axis),
                        fused=False,
                        log_coordinates=log_coordinates,
                    )
                except ValueError:  # the reduced grid cannot fill its missing cells
                    continue
                b, q, length = (axes[i][cell[i]] for i in range(3))
                predicted = float(model.decode_ms(b, b * q, b * length))
                errors.append(abs(predicted - measured) / measured)
        errors = np.array(errors)
        result["log" if log_coordinates else "linear"] = _summary(errors)
    return result


def _summary(errors) -> dict:
    import numpy as np

    return {
        "cells": int(errors.size),
        "median": round(float(np.median(errors)), 4),
        "p90": round(float(np.quantile(errors, 0.9)), 4),
        "max": round(float(errors.max()), 4),
    }


def fit(args: argparse.Namespace) -> None:
    """Fit the roofline prior to each packaged table and record its error on every cell."""
    import numpy as np

    from policies.cost_model import fit_step_cost
    from policies.profiles import TABLE_PROFILES, fit_step_table, step_table, table_cells

    result = {"command": "python scripts/measure_gpu_step_cost.py fit", "profiles": {}}
    for name in args.profiles.split(","):
        table = step_table(name)
        model = fit_step_table(table)
        shapes, seconds = table_cells(table)
        predicted = model.times(shapes)
        errors = np.abs(predicted - seconds) / seconds
        context_only = fit_step_cost(
            shapes.num_tokens, seconds, context_tokens=shapes.context_tokens, weights=seconds**-2.0
        )
        context_errors = np.abs(context_only.times(shapes) - seconds) / seconds
        requests = shapes.num_requests
        cells = [
            [
                int(b),
                round(float(t / b), 3),
                round(float(kv / b), 1),
                round(s * 1e3, 4),
                round(p * 1e3, 4),
                round(float(e), 4),
            ]
            for b, t, kv, s, p, e in zip(
                requests,
                shapes.num_tokens,
                shapes.kv_tokens,
                seconds,
                predicted,
                errors,
                strict=True,
            )
        ]
        result["profiles"][name] = {
            "table": TABLE_PROFILES[name][0],
            "fused": table.fused,
            "filled_cells": table.num_filled_cells,
            "raised_cells": table.num_raised_cells,
            "model": model.to_spec(),
            "fields": dataclasses.asdict(model),
            "error": _summary(errors),
            "error_context_only": {"model": context_only.to_spec(), **_summary(context_errors)},
            "cells_columns": ["B", "q", "L", "table_ms", "fit_ms", "rel_error"],
            "cells": cells,
        }
        log(f"{name}: {model.to_spec()} error {_summary(errors)}")
        log(f"{name} with c_ctx only: {_summary(context_errors)}")
    result["interpolation_leave_one_row_out"] = _leave_one_row_out(step_table(args.loo_profile))
    log(f"leave one row out: {result['interpolation_leave_one_row_out']}")
    _dump(result, Path(args.output))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="measure cells of one model shape")
    run_parser.add_argument("--model", choices=sorted(SHAPES), default="qwen25_7b")
    run_parser.add_argument("--parts", default="prefill,fused", help="prefill,fused,decode")
    run_parser.add_argument("--decode-b", type=_ints, default=DECODE_B)
    run_parser.add_argument("--decode-k", type=_ints, default=DECODE_K)
    run_parser.add_argument("--decode-l", type=_ints, default=DECODE_L)
    run_parser.add_argument(
        "--budget-s", type=float, default=540.0, help="stop starting cells after"
    )
    run_parser.add_argument("--cpu", action="store_true")
    run_parser.add_argument("--no-compile", action="store_true", help="fused = eager (logic check)")
    smoke_parser = sub.add_parser("smoke", help="tiny shapes on the CPU")
    smoke_parser.add_argument("--no-compile", action="store_true")
    pack_parser = sub.add_parser("pack", help="write the packaged table")
    pack_parser.add_argument("--decode", required=True)
    pack_parser.add_argument("--measured")
    pack_parser.add_argument("--out", required=True)
    pack_parser.add_argument("--what", default="one engine step, H100, bf16, CUDA graph")
    fit_parser = sub.add_parser("fit", help="fit the roofline prior to the packaged tables")
    fit_parser.add_argument(
        "--profiles",
        default="h100,h100_qwen25_7b_unfused,h100_qwen3_8b_step,h100_qwen3_8b_step_unfused",
    )
    fit_parser.add_argument("--loo-profile", default="h100_qwen25_7b_unfused")
    fit_parser.add_argument("--output", default="benchmarks/results/gpu_step_cost_fit.json")
    args = parser.parse_args(argv)
    {"run": run, "smoke": smoke, "pack": pack, "fit": fit}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
