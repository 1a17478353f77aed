"""Prompt-lookup n-gram drafting (vLLM's ``ngram`` method), with the drafter lifecycle API.

A baseline for the replay: each request drafts from its own prompt and output only. The last
``n`` tokens (``n`` from ``max_n`` down to ``min_n``) are searched earlier in the request's own
tokens; the most recent earlier occurrence's continuation is the draft.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np
from numba import njit

from das.drafter import Proposal
from suffix_tree.draft import DraftBatch
from suffix_tree.validation import to_token_array


@njit(cache=True)
def _ngram_draft(tokens, length, min_n, max_n, max_tokens, out):
    # Longest n first; among occurrences of that n-gram, the most recent one that has a
    # continuation. Returns the number of draft tokens written to `out`.
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        for start in range(length - n - 1, -1, -1):
            match = True
            for i in range(n):
                if tokens[start + i] != tokens[length - n + i]:
                    match = False
                    break
            if match:
                num = min(max_tokens, length - (start + n))
                for i in range(num):
                    out[i] = tokens[start + n + i]
                return num
    return 0


class NgramDrafter:
    """Drafts by prompt lookup in each request's own tokens; keeps no history."""

    def __init__(self, num_speculative_tokens: int = 8, min_n: int = 2, max_n: int = 5) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"min_n={min_n}, max_n={max_n} must satisfy 1 <= min_n <= max_n")
        self.num_speculative_tokens = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n
        self._tokens: dict[Hashable, np.ndarray] = {}
        self._lengths: dict[Hashable, int] = {}

    def begin_step(self, step: int | None = None) -> None:
        del step  # no history

    def start_request(
        self, request_id: Hashable, prompt_tokens: Iterable[int], prompt_key: str | None = None
    ) -> None:
        prompt = to_token_array(prompt_tokens, "prompt_tokens")
        buffer = np.zeros(max(64, 2 * prompt.size), np.int32)
        buffer[: prompt.size] = prompt
        self._tokens[request_id] = buffer
        self._lengths[request_id] = int(prompt.size)

    def extend_many(self, request_ids: Sequence[Hashable], tokens: Sequence[np.ndarray]) -> None:
        for request_id, chunk in zip(request_ids, tokens, strict=True):
            length = self._lengths[request_id]
            buffer = self._tokens[request_id]
            if length + len(chunk) > buffer.size:
                buffer = np.resize(buffer, 2 * (length + len(chunk)))
                self._tokens[request_id] = buffer
            buffer[length : length + len(chunk)] = chunk
            self._lengths[request_id] = length + len(chunk)

    def propose(self, request_ids: Sequence[Hashable]) -> Proposal:
        rows = len(request_ids)
        k = self.num_speculative_tokens
        tokens = np.zeros((rows, k), np.int32)
        num = np.zeros(rows, np.int64)
        for row, request_id in enumerate(request_ids):
            num[row] = _ngram_draft(
                self._tokens[request_id],
                self._lengths[request_id],
                self.min_n,
                self.max_n,
                k,
                tokens[row],
            )
        probs = (np.arange(k)[None, :] < num[:, None]).astype(np.float64)
        drafts = DraftBatch(tokens, probs, num, num.astype(np.float64), np.zeros(rows, np.int64))
        return Proposal(drafts, np.where(num > 0, 0, -1).astype(np.int8), np.full(rows, k))

    def finish_request(
        self, request_id: Hashable, finish_reason: str, stop_token_ids: Iterable[int] = ()
    ) -> None:
        del finish_reason, stop_token_ids
        self.abort_request(request_id)

    def abort_request(self, request_id: Hashable) -> None:
        del self._tokens[request_id], self._lengths[request_id]
