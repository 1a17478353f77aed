"""Test-only draft faults: show, inside a real engine, that verification decides every token.

A :class:`DraftFault` installed on a :class:`~das.vllm.proposer.DASProposer` (through
``llm.collective_rpc("das_set_fault", args=(mode,))``) corrupts what the drafter proposes, or
makes the proposer fail, so that tests can check the outputs stay those of an engine without
speculation. Never enable one in training: it only slows decoding down.

Modes:
    ``random``: every draft token is a uniform random id in the vocabulary.
    ``shifted``: the right drafts one position late (the row's last token, then all but the last
        draft token): the off-by-one a wrong context pointer would produce.
    ``out_of_vocab``: the second draft token is an id past the vocabulary (the proposer must cut
        the draft there).
    ``raise``: every ``every``-th propose call raises inside the proposer (a drafter bug).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODES = ("random", "shifted", "out_of_vocab", "raise")


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


@dataclass
class DraftFault:
    """One test-only fault (see the module docstring for the modes)."""

    mode: str
    every: int = 1
    seed: int = 0
    num_calls: int = 0
    num_raised: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")
        self._rng = np.random.default_rng(self.seed)

    def before_propose(self) -> None:
        """Count a propose call; raise on every ``every``-th one in ``raise`` mode."""
        self.num_calls += 1
        if self.mode == "raise" and self.num_calls % self.every == 0:
            self.num_raised += 1
            raise InjectedFault(f"injected drafter fault #{self.num_raised}")

    def corrupt(self, tokens: np.ndarray, last_tokens: np.ndarray, vocab_size: int) -> None:
        """Rewrite the drafts in place (one row per request, draft lengths unchanged);
        ``last_tokens[r]`` is the last token row r's request holds."""
        if self.mode == "random":
            tokens[:] = self._rng.integers(0, vocab_size, size=tokens.shape, dtype=tokens.dtype)
        elif self.mode == "shifted":
            tokens[:, 1:] = tokens[:, :-1].copy()
            tokens[:, 0] = last_tokens
        elif self.mode == "out_of_vocab" and tokens.shape[1] > 1:
            tokens[:, 1] = vocab_size + 5
