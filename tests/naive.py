"""Slow, obviously-correct reference for the suffix tree: brute force over the stored sequences.

Semantics it pins down (and the numba tree must match):
* count(P) = number of (sequence, start) with sequence[start:start+len(P)] == P, len(P) <= depth.
* The continuation of P is the token t maximising count(P + t), ties to the smallest token,
  with conditional probability count(P + t) / count(P); only while len(P + t) <= depth.
* known_continuation: the longest prefix P' of a given continuation with count(S + P') > 0 for
  some suffix S of the context that occurs (len(S) = m), within the bounds of a draft from S
  (the budget, m * max_spec_factor, len(S + P') <= depth); ties go to the longer match.
* tree_draft: for each match length m, every position below the match within the bounds of a
  draft from it, each with the product of its path's count ratios; the ``max_nodes`` most
  probable form the tree, and the match whose tree sums highest wins (ties: the longer).
* speculate tries every match length m = 1..min(len(context), depth) while the last m context
  tokens occur, walks the greedy continuation (stopping at the budget, when the cumulative
  probability drops below min_token_prob, or at depth), and keeps the best score (sum of
  cumulative probabilities); ties go to the longer match.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


class NaiveSuffixForest:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.sequences: dict[Hashable, list[int]] = {}
        self.tree_of: dict[Hashable, Hashable] = {}

    def append(self, seq_id: Hashable, tokens: Sequence[int], tree: Hashable = 0) -> None:
        self.sequences.setdefault(seq_id, [])
        self.tree_of.setdefault(seq_id, tree)
        self.sequences[seq_id].extend(int(t) for t in tokens)

    def remove(self, seq_id: Hashable) -> None:
        del self.sequences[seq_id]
        del self.tree_of[seq_id]

    def count(self, pattern: Sequence[int], tree: Hashable = 0) -> int:
        m = len(pattern)
        if m > self.max_depth:
            return 0
        pattern = list(pattern)
        total = 0
        for seq_id, seq in self.sequences.items():
            if self.tree_of[seq_id] != tree:
                continue
            for start in range(len(seq) - m + 1):
                if seq[start : start + m] == pattern:
                    total += 1
        return total

    def children(self, pattern: Sequence[int], tree: Hashable = 0) -> dict[int, int]:
        if len(pattern) + 1 > self.max_depth:
            return {}
        candidates = set()
        m = len(pattern)
        for seq_id, seq in self.sequences.items():
            if self.tree_of[seq_id] != tree:
                continue
            for start in range(len(seq) - m):
                if seq[start : start + m] == list(pattern):
                    candidates.add(seq[start + m])
        return {t: self.count([*pattern, t], tree) for t in candidates}

    def speculate(
        self,
        context: Sequence[int],
        max_tokens: int,
        tree: Hashable = 0,
        min_token_prob: float = 0.1,
        max_spec_factor: float | None = None,
    ) -> tuple[list[int], list[float], float, int]:
        context = [int(t) for t in context][-self.max_depth :]
        best: tuple[list[int], list[float], float, int] = ([], [], -1.0, 0)
        for m in range(1, min(len(context), self.max_depth) + 1):
            pattern = context[len(context) - m :]
            if self.count(pattern, tree) == 0:
                break
            budget = max_tokens
            if max_spec_factor is not None:
                budget = min(budget, int(m * max_spec_factor + 1e-6))
            tokens: list[int] = []
            probs: list[float] = []
            cumulative, score = 1.0, 0.0
            path = list(pattern)
            while len(tokens) < budget and len(path) < self.max_depth:
                options = self.children(path, tree)
                if not options:
                    break
                token = min(options, key=lambda t: (-options[t], t))
                prob = options[token] / self.count(path, tree)
                cumulative *= prob
                if cumulative < min_token_prob:
                    break
                tokens.append(token)
                probs.append(prob)
                score += cumulative
                path.append(token)
            if score >= best[2]:
                best = (tokens, probs, score, m)
        if best[2] < 0:
            return [], [], 0.0, 0
        return best

    def known_continuation(
        self,
        context: Sequence[int],
        continuation: Sequence[int],
        max_tokens: int,
        tree: Hashable = 0,
        max_spec_factor: float | None = None,
    ) -> tuple[int, int]:
        """(how many leading tokens of ``continuation`` the tree holds, the match length)."""
        context = [int(t) for t in context][-self.max_depth :]
        continuation = [int(t) for t in continuation]
        best = (0, 0)
        for m in range(1, len(context) + 1):
            pattern = context[len(context) - m :]
            if self.count(pattern, tree) == 0:
                break
            cap = min(max_tokens, len(continuation), self.max_depth - m)
            if max_spec_factor is not None:
                cap = min(cap, int(m * max_spec_factor + 1e-6))
            held = 0
            while held < cap and self.count(pattern + continuation[: held + 1], tree) > 0:
                held += 1
            if held > 0 and held >= best[0]:
                best = (held, m)
        return best

    def tree_draft(
        self,
        context: Sequence[int],
        max_nodes: int,
        max_path: int,
        tree: Hashable = 0,
        max_spec_factor: float | None = None,
    ) -> tuple[list[tuple[float, list[int]]], int]:
        """(every position below the winning match as (probability, path below the match),
        most probable first, of which the first ``max_nodes`` form the tree; the match
        length); ([], 0) without a match."""
        context = [int(t) for t in context][-self.max_depth :]
        best: tuple[list[tuple[float, list[int]]], int] = ([], 0)
        best_sum = -1.0
        for m in range(1, len(context) + 1):
            pattern = context[len(context) - m :]
            if self.count(pattern, tree) == 0:
                break
            cap = min(max_path, self.max_depth - m)
            if max_spec_factor is not None:
                cap = min(cap, int(m * max_spec_factor + 1e-6))
            positions: list[tuple[float, list[int]]] = []
            frontier = [(1.0, [])]
            while frontier:
                cumulative, path = frontier.pop()
                if len(path) >= cap:
                    continue
                parent = self.count(pattern + path, tree)
                for token, count in self.children(pattern + path, tree).items():
                    child = (cumulative * (count / parent), [*path, token])
                    positions.append(child)
                    frontier.append(child)
            positions.sort(key=lambda item: -item[0])
            chosen = positions[:max_nodes]
            total = sum(p for p, _ in chosen)  # in the kernel's order: most probable first
            if chosen and total >= best_sum:
                best, best_sum = (positions, m), total
        return best
