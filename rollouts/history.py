"""History of finished rollouts per prompt, over a sliding window of training steps.

The store owns no tokens itself: sequences live in a :class:`SuffixForest` (one tree per prompt
key, plus an optional global tree). It only remembers which sequence belongs to which step and
prompt, evicts steps that leave the window with incremental tree removals (never a rebuild),
and keeps per-prompt length statistics for the length-aware budget policy.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from suffix_tree import SuffixForest

logger = logging.getLogger(__name__)

GLOBAL_TREE = ("global",)


def prompt_tree(prompt_key: str) -> tuple[str, str]:
    """The forest key of a prompt's history tree."""
    return ("prompt", prompt_key)


@dataclass(frozen=True, slots=True)
class HistoryStats:
    num_steps: int
    num_prompts: int
    num_rollouts: int
    num_tokens: int
    memory_bytes: int


class HistoryStore:
    """Rollouts per prompt key and step, windowed to the last ``window_steps`` steps.

    A rollout's response is stored once in its prompt's tree and, when ``use_global_tree``,
    once more in the global tree. Rollouts are either added whole (:meth:`add_rollout`) or
    adopted after being grown live in the prompt tree by the drafter (:meth:`adopt_live`).
    """

    def __init__(
        self,
        forest: SuffixForest,
        window_steps: int = 5,
        use_global_tree: bool = True,
        max_tokens: int = 50_000_000,
    ) -> None:
        if window_steps <= 0:
            raise ValueError(f"window_steps={window_steps} must be > 0")
        self.forest = forest
        self.window_steps = window_steps
        self.use_global_tree = use_global_tree
        self.max_tokens = max_tokens
        self._by_step: dict[int, list[tuple[Hashable, ...]]] = defaultdict(list)
        self._lengths: dict[str, deque[tuple[int, int]]] = defaultdict(deque)
        self._num_tokens = 0
        self._next_id = 0

    # ---------------------------------------------------------------------------- adding
    def add_rollout(self, prompt_key: str, step: int, response_tokens: np.ndarray) -> None:
        """Store a finished rollout's response (already trimmed past its stop token)."""
        seq_id = ("hist", self._next_id)
        self._next_id += 1
        self.forest.append(seq_id, response_tokens, tree=prompt_tree(prompt_key))
        self._register(prompt_key, step, seq_id, response_tokens)

    def adopt_live(self, prompt_key: str, step: int, seq_id: Hashable) -> None:
        """Keep a sequence grown live in the prompt tree as this step's finished rollout."""
        tokens = self.forest.sequence_tokens(seq_id)
        self._register(prompt_key, step, seq_id, tokens)

    def _register(self, prompt_key: str, step: int, seq_id: Hashable, tokens: np.ndarray) -> None:
        entries = [seq_id]
        if self.use_global_tree:
            global_id = ("global", seq_id)
            self.forest.append(global_id, tokens, tree=GLOBAL_TREE)
            entries.append(global_id)
        self._by_step[step].extend(entries)
        self._lengths[prompt_key].append((step, len(tokens)))
        self._num_tokens += len(tokens) * len(entries)
        while self._num_tokens > self.max_tokens and len(self._by_step) > 1:
            self._evict_step(min(self._by_step))

    # -------------------------------------------------------------------------- window
    def begin_step(self, step: int) -> None:
        """Evict the steps that fall out of the window ending just before ``step``."""
        for old in [s for s in self._by_step if s <= step - self.window_steps - 1]:
            self._evict_step(old)
        for lengths in self._lengths.values():
            while lengths and lengths[0][0] <= step - self.window_steps - 1:
                lengths.popleft()

    def _evict_step(self, step: int) -> None:
        for seq_id in self._by_step.pop(step):
            self._num_tokens -= self.forest.sequence_length(seq_id)
            self.forest.remove(seq_id)
        logger.debug("evicted history of step %d", step)

    # --------------------------------------------------------------------------- stats
    def mean_length(self, prompt_key: str) -> float:
        """Mean response length of the prompt's rollouts in the window (nan if none)."""
        lengths = self._lengths.get(prompt_key)
        if not lengths:
            return float("nan")
        return float(np.mean([n for _, n in lengths]))

    def mean_lengths(self) -> dict[str, float]:
        return {key: self.mean_length(key) for key, lengths in self._lengths.items() if lengths}

    @property
    def steps(self) -> list[int]:
        return sorted(self._by_step)

    def stats(self) -> HistoryStats:
        num_rollouts = sum(
            1 for ids in self._by_step.values() for seq_id in ids if seq_id[0] != "global"
        )
        return HistoryStats(
            num_steps=len(self._by_step),
            num_prompts=sum(1 for lengths in self._lengths.values() if lengths),
            num_rollouts=num_rollouts,
            num_tokens=self._num_tokens,
            memory_bytes=self.forest.memory().total,
        )
