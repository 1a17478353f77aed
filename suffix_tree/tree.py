"""A single suffix tree: the one-tree view of a :class:`SuffixForest`."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from suffix_tree.draft import Draft
from suffix_tree.forest import DEFAULT_MAX_DEPTH, MemoryReport, SuffixForest


class SuffixTree:
    """Depth-bounded suffix tree over many int32 token sequences.

    ``extend`` / ``remove`` / ``speculate`` mirror ArcticInference's ``SuffixTree`` so the two
    can be benchmarked on one workload.
    """

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._forest = SuffixForest(max_depth=max_depth)
        self.max_depth = self._forest.max_depth

    @property
    def num_sequences(self) -> int:
        return self._forest.num_sequences

    def extend(self, seq_id: Hashable, tokens: Iterable[int] | np.ndarray) -> None:
        """Append tokens to ``seq_id`` (created on first use)."""
        self._forest.append(seq_id, tokens)

    def remove(self, seq_id: Hashable) -> None:
        self._forest.remove(seq_id)

    def speculate(
        self,
        context: Iterable[int] | np.ndarray,
        max_tokens: int,
        min_token_prob: float = 0.1,
        max_spec_factor: float | None = None,
    ) -> Draft:
        """See :meth:`SuffixForest.speculate`."""
        # Positional: this is the per-call path.
        return self._forest.speculate(context, max_tokens, 0, min_token_prob, max_spec_factor)

    def check_integrity(self) -> None:
        self._forest.check_integrity()

    def memory(self) -> MemoryReport:
        return self._forest.memory()
