"""History of finished rollouts per prompt, windowed by the prompt's appearances.

The store owns no tokens itself: sequences live in a :class:`SuffixForest` (one tree per prompt
key, plus an optional global tree). It remembers which sequence belongs to which prompt and step,
evicts with incremental tree removals (never a rebuild), and keeps per-prompt length statistics
for the length-aware budget policy.

Windows:

* A prompt's history keeps the rollouts of its last ``window_appearances`` appearances (steps in
  which it had finished rollouts) before the current step, however many steps lie between them:
  with a large dataset a prompt comes back once per epoch, tens of steps later. The legacy rule
  ``window_rule="steps"`` keeps the rollouts of the last ``window_steps`` steps instead.
* All prompts' histories together hold at most ``max_tokens`` tokens: the least recently seen
  prompts are dropped first. One prompt holds at most ``max_prompt_tokens``: its oldest rollouts
  go first.
* The global tree keeps the rollouts of the last ``window_steps`` steps, at most
  ``max_global_tokens`` tokens (oldest rollouts first).

A prompt whose history empties while none of its requests runs (see :meth:`HistoryStore.hold`)
has its tree dropped from the forest and its length statistics forgotten, so memory follows the
budget, not the number of distinct prompts seen.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from suffix_tree import SuffixForest

logger = logging.getLogger(__name__)

GLOBAL_TREE = ("global",)
WINDOW_RULES = ("appearances", "steps")


def prompt_tree(prompt_key: str) -> tuple[str, str]:
    """The forest key of a prompt's history tree."""
    return ("prompt", prompt_key)


@dataclass(frozen=True, slots=True)
class HistoryStats:
    """What the store holds. ``num_tokens``: tokens in the forest, prompt and global copies."""

    num_steps: int
    num_prompts: int
    num_rollouts: int
    num_tokens: int
    memory_bytes: int
    num_prompt_tokens: int = 0
    num_global_tokens: int = 0
    num_prompt_trees: int = 0

    @property
    def bytes_per_token(self) -> float:
        """Forest bytes (allocated, all trees) per token stored in history."""
        return self.memory_bytes / max(1, self.num_tokens)


@dataclass(slots=True)
class _Rollout:
    step: int
    seq_id: Hashable | None  # None: not stored in a tree (only its length is kept)
    num_tokens: int


@dataclass(slots=True)
class _PromptHistory:
    """One prompt's rollouts, oldest first; ``appearances``: their distinct steps, in order."""

    rollouts: deque[_Rollout] = field(default_factory=deque)
    appearances: deque[int] = field(default_factory=deque)
    num_tokens: int = 0


class HistoryStore:
    """Rollouts per prompt key, windowed by appearances and bounded by token budgets.

    A rollout's response is stored once in its prompt's tree (unless ``use_prompt_trees`` is
    false: then only its length is kept, for the length statistics) and, when
    ``use_global_tree``, once more in the global tree. Rollouts are either added whole
    (:meth:`add_rollout`) or adopted after being grown live in the prompt tree by the drafter
    (:meth:`adopt_live`).
    Invariant after every add: prompt histories hold at most ``max_tokens`` tokens, each at most
    ``max_prompt_tokens``, and the global tree at most ``max_global_tokens``.
    """

    def __init__(
        self,
        forest: SuffixForest,
        window_steps: int = 5,
        use_global_tree: bool = True,
        max_tokens: int = 50_000_000,
        *,
        window_appearances: int = 4,
        window_rule: str = "appearances",
        max_prompt_tokens: int | None = None,
        max_global_tokens: int | None = None,
        use_prompt_trees: bool = True,
    ) -> None:
        max_prompt_tokens = max_tokens if max_prompt_tokens is None else max_prompt_tokens
        max_global_tokens = max_tokens if max_global_tokens is None else max_global_tokens
        for name, value in (
            ("window_steps", window_steps),
            ("window_appearances", window_appearances),
            ("max_tokens", max_tokens),
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_global_tokens", max_global_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if window_rule not in WINDOW_RULES:
            raise ValueError(f"window_rule={window_rule!r} must be one of {WINDOW_RULES}")
        self.forest = forest
        self.window_steps = window_steps
        self.window_appearances = window_appearances
        self.window_rule = window_rule
        self.use_global_tree = use_global_tree
        self.use_prompt_trees = use_prompt_trees
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_global_tokens = max_global_tokens
        # Least recently seen prompt first.
        self._prompts: OrderedDict[str, _PromptHistory] = OrderedDict()
        self._num_prompt_tokens = 0
        self._global: deque[_Rollout] = deque()  # in the order added: steps never decrease
        self._num_global_tokens = 0
        self._holds: dict[str, int] = {}  # running requests per prompt key
        self._touched: set[str] = set()  # prompts that got rollouts since the last begin_step
        self._step = 0
        self._next_id = 0

    # ---------------------------------------------------------------------------- adding
    def add_rollout(self, prompt_key: str, step: int, response_tokens: np.ndarray) -> None:
        """Store a finished rollout's response (already trimmed past its stop token)."""
        seq_id = ("hist", self._next_id)
        self._next_id += 1
        if self.use_prompt_trees:
            self.forest.append(seq_id, response_tokens, tree=prompt_tree(prompt_key))
        self._register(prompt_key, step, seq_id, response_tokens)

    def adopt_live(self, prompt_key: str, step: int, seq_id: Hashable) -> None:
        """Keep a sequence grown live in the prompt tree as this step's finished rollout."""
        tokens = self.forest.sequence_tokens(seq_id)
        self._register(prompt_key, step, seq_id, tokens)

    def _register(self, prompt_key: str, step: int, seq_id: Hashable, tokens: np.ndarray) -> None:
        num_tokens = len(tokens)
        if self.use_global_tree:
            global_id = ("global", seq_id)
            self.forest.append(global_id, tokens, tree=GLOBAL_TREE)
            self._global.append(_Rollout(step, global_id, num_tokens))
            self._num_global_tokens += num_tokens
            while self._num_global_tokens > self.max_global_tokens:
                self._evict_global()
        history = self._prompts.get(prompt_key)
        if history is None:
            history = self._prompts[prompt_key] = _PromptHistory()
        self._prompts.move_to_end(prompt_key)
        stored_id = seq_id if self.use_prompt_trees else None
        history.rollouts.append(_Rollout(step, stored_id, num_tokens))
        if not history.appearances or history.appearances[-1] != step:
            history.appearances.append(step)
        history.num_tokens += num_tokens
        self._num_prompt_tokens += num_tokens
        self._touched.add(prompt_key)
        while history.num_tokens > self.max_prompt_tokens:
            self._evict_oldest_rollout(prompt_key, history)
        while self._num_prompt_tokens > self.max_tokens:
            lru_key = next(iter(self._prompts))
            if lru_key == prompt_key:  # the only prompt left: trim it from its oldest rollout
                self._evict_oldest_rollout(prompt_key, self._prompts[prompt_key])
            else:
                self._drop_prompt(lru_key)
        self._drop_if_unused(prompt_key)  # a rollout larger than a budget was evicted at once

    # -------------------------------------------------------------------------- requests
    def hold(self, prompt_key: str) -> None:
        """A request of ``prompt_key`` started: keep its tree while it runs, mark it as seen."""
        self._holds[prompt_key] = self._holds.get(prompt_key, 0) + 1
        if prompt_key in self._prompts:
            self._prompts.move_to_end(prompt_key)

    def release(self, prompt_key: str) -> None:
        """A request of ``prompt_key`` ended (after its rollout, if any, was added)."""
        count = self._holds.get(prompt_key, 0)
        if count <= 0:
            raise ValueError(f"prompt_key={prompt_key!r} has no running request to release")
        if count == 1:
            del self._holds[prompt_key]
            self._drop_if_unused(prompt_key)
        else:
            self._holds[prompt_key] = count - 1

    # -------------------------------------------------------------------------- window
    def begin_step(self, step: int) -> None:
        """Evict what falls out of the windows as step ``step`` starts."""
        self._step = step
        oldest_kept_step = step - self.window_steps
        while self._global and self._global[0].step < oldest_kept_step:
            self._evict_global()
        if self.window_rule == "steps":
            for key in list(self._prompts):
                history = self._prompts[key]
                while history.rollouts and history.rollouts[0].step < oldest_kept_step:
                    self._evict_oldest_rollout(key, history)
                self._drop_if_unused(key)
        else:
            # Only prompts that got rollouts since the last trim can hold too many appearances.
            for key in self._touched:
                history = self._prompts.get(key)
                if history is None:
                    continue
                num_before = sum(1 for s in history.appearances if s < step)
                for _ in range(num_before - self.window_appearances):
                    oldest = history.appearances[0]
                    while history.rollouts and history.rollouts[0].step == oldest:
                        self._evict_oldest_rollout(key, history)
                self._drop_if_unused(key)
        self._touched.clear()

    # -------------------------------------------------------------------------- eviction
    def _evict_global(self) -> None:
        rollout = self._global.popleft()
        self._num_global_tokens -= rollout.num_tokens
        self.forest.remove(rollout.seq_id)

    def _evict_oldest_rollout(self, prompt_key: str, history: _PromptHistory) -> None:
        rollout = history.rollouts.popleft()
        history.num_tokens -= rollout.num_tokens
        self._num_prompt_tokens -= rollout.num_tokens
        if rollout.seq_id is not None:
            self.forest.remove(rollout.seq_id)
        if not history.rollouts or history.rollouts[0].step != rollout.step:
            history.appearances.popleft()  # that appearance has no rollout left

    def _drop_prompt(self, prompt_key: str) -> None:
        history = self._prompts[prompt_key]
        while history.rollouts:
            self._evict_oldest_rollout(prompt_key, history)
        self._drop_if_unused(prompt_key)
        logger.debug("dropped the history of prompt %s", prompt_key)

    def _drop_if_unused(self, prompt_key: str) -> None:
        # An empty history is forgotten; its tree goes too unless a running request grows in it.
        history = self._prompts.get(prompt_key)
        if history is not None and history.rollouts:
            return
        self._prompts.pop(prompt_key, None)
        tree = prompt_tree(prompt_key)
        if prompt_key not in self._holds and self.forest.has_tree(tree):
            self.forest.drop_tree(tree)

    # --------------------------------------------------------------------------- stats
    def mean_length(self, prompt_key: str) -> float:
        """Mean response length of the prompt's rollouts in history (nan if none)."""
        history = self._prompts.get(prompt_key)
        if history is None or not history.rollouts:
            return float("nan")
        return history.num_tokens / len(history.rollouts)

    def mean_lengths(self) -> dict[str, float]:
        """Mean response length of every prompt with history."""
        return {key: h.num_tokens / len(h.rollouts) for key, h in self._prompts.items()}

    def prompt_keys(self) -> list[str]:
        """Prompts with history, least recently seen first."""
        return list(self._prompts)

    def appearances(self, prompt_key: str) -> list[int]:
        """Steps of the prompt's appearances held in history, oldest first."""
        history = self._prompts.get(prompt_key)
        return [] if history is None else list(history.appearances)

    def rollout_ids(self, prompt_key: str) -> list[Hashable]:
        """Forest sequence ids of the prompt's rollouts in history, oldest first."""
        history = self._prompts.get(prompt_key)
        if history is None:
            return []
        return [r.seq_id for r in history.rollouts if r.seq_id is not None]

    def held_sequence_ids(self) -> list[Hashable]:
        """Every forest sequence the store holds: prompt-tree rollouts, then global copies."""
        held = [r.seq_id for h in self._prompts.values() for r in h.rollouts]
        held = [seq_id for seq_id in held if seq_id is not None]
        held.extend(r.seq_id for r in self._global)
        return held

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of all prompts' histories (counted even where only lengths are kept)."""
        return self._num_prompt_tokens

    @property
    def num_stored_tokens(self) -> int:
        """Tokens the store keeps in the forest: prompt trees and global tree."""
        prompt_tokens = self._num_prompt_tokens if self.use_prompt_trees else 0
        return prompt_tokens + self._num_global_tokens

    @property
    def steps(self) -> list[int]:
        """Steps with any rollout in history (prompt trees or global tree)."""
        steps = {r.step for r in self._global}
        for history in self._prompts.values():
            steps.update(history.appearances)
        return sorted(steps)

    def stats(self) -> HistoryStats:
        return HistoryStats(
            num_steps=len(self.steps),
            num_prompts=len(self._prompts),
            num_rollouts=sum(len(h.rollouts) for h in self._prompts.values()),
            num_tokens=self.num_stored_tokens,
            memory_bytes=self.forest.memory().total,
            num_prompt_tokens=self._num_prompt_tokens,
            num_global_tokens=self._num_global_tokens,
            num_prompt_trees=sum(
                1
                for key in {*self._prompts, *self._holds}
                if self.forest.has_tree(prompt_tree(key))
            ),
        )
