"""Whether looking a batch's drafts up pays for the drafter's own time.

A speculative engine asks for drafts between one step's sampling and the next step's launch,
so the drafter's lookups are in series with the GPU. In a large batch the cost-model policy
gives few drafts a budget and those save little, while looking every request up in the
suffix trees costs the drafter time per request. The gate learns, per band of batch sizes
(powers of two), what a looked-up request's drafts saved in recent passes: the step time of
their accepted tokens at the pass's time per produced token, less what verifying the drafted
tokens added to the step. A band whose recent saving per request falls below the lookup's cost
is skipped, but one pass in ``explore_every`` of a band skipped in a row is looked up anyway,
so that the estimate follows the run.
"""

from __future__ import annotations

import math

from policies._checks import check_int, check_real

__all__ = ["LookupGate"]


class LookupGate:
    """Per band of batch sizes, an average of what a lookup saved per request.

    Args:
        lookup_s_per_request: the drafter's time to look one request's drafts up, in seconds.
        explore_every: in a band that is being skipped, every this-many-th pass looks up.
        weight: weight of the newest pass in a band's running average.
    """

    def __init__(
        self, lookup_s_per_request: float, explore_every: int = 16, weight: float = 0.05
    ) -> None:
        self.lookup_s_per_request = check_real(
            lookup_s_per_request, "lookup_s_per_request", minimum=0.0
        )
        self.explore_every = check_int(explore_every, "explore_every", minimum=1)
        self.weight = check_real(weight, "weight", minimum=0.0)
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight={weight!r} must be in (0, 1]")
        self.saving_per_request: dict[int, float] = {}  # band -> seconds saved per request
        self._skipped_in_a_row: dict[int, int] = {}

    @staticmethod
    def band(num_requests: int) -> int:
        """The band of a batch of ``num_requests`` (>= 1): floor(log2(num_requests))."""
        return int(math.log2(max(1, num_requests)))

    def should_look_up(self, num_requests: int) -> bool:
        """Whether to look up the drafts of a batch of ``num_requests`` requests."""
        if self.lookup_s_per_request == 0.0 or num_requests <= 0:
            return True
        band = self.band(num_requests)
        saving = self.saving_per_request.get(band)
        if saving is None or saving >= self.lookup_s_per_request:
            self._skipped_in_a_row[band] = 0
            return True
        skipped = self._skipped_in_a_row.get(band, 0) + 1
        if skipped >= self.explore_every:
            self._skipped_in_a_row[band] = 0
            return True
        self._skipped_in_a_row[band] = skipped
        return False

    def record(
        self,
        num_requests: int,
        accepted_tokens: int,
        plain_step_s: float,
        drafted_step_s: float,
    ) -> None:
        """What a looked-up batch of ``num_requests`` saved: ``accepted_tokens`` of its drafts
        were accepted, a step without drafts takes ``plain_step_s`` and with the verified
        drafts ``drafted_step_s`` (both from the policy's cost model)."""
        if num_requests <= 0:
            return
        per_token = plain_step_s / num_requests  # a pass's time per produced token
        saving = (accepted_tokens * per_token - (drafted_step_s - plain_step_s)) / num_requests
        band = self.band(num_requests)
        previous = self.saving_per_request.get(band)
        self.saving_per_request[band] = (
            saving if previous is None else previous + self.weight * (saving - previous)
        )
