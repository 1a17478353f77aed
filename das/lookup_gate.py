"""Whether looking a batch's drafts up pays for the drafter's own time.

A speculative engine asks for drafts between one step's sampling and the next step's launch,
so the drafter's lookups are in series with the GPU. In a large batch the cost-model policy
gives few drafts a budget and those save little, while looking every request up in the
suffix trees costs the drafter time per request. The gate learns, per band of batch sizes
(powers of two), what a looked-up request's drafts saved in recent passes: the step time of
their accepted tokens at the pass's time per produced token, less what verifying the drafted
tokens added to the step. A band whose recent saving per request falls below the lookup's cost
is skipped, but one pass in ``explore_every`` of a band skipped in a row is looked up anyway,
so that the estimate follows the run. A band whose lookups take less than ``min_step_share`` of
its steps' time is never skipped: skipping could save no more than that share, while a skip
in a run of accepted drafts loses whole steps (small batches of long reasoning requests, whose
drafts are accepted in bursts).

The lookup's cost is either given (seconds per request, for replays that must not depend on
the machine's clock) or measured: the drafter reports each lookup's wall time, and the gate
keeps, per band, the median per-request time of the band's last ``MEASURED_LOOKUPS`` lookups
(a median, so that a first call that compiles a kernel or a pause of the process does not
stand for the band), and prices a band only once it holds ``MIN_MEASURED_LOOKUPS`` of them.
A band's running averages start as plain means of its first passes (``1 / weight`` of them),
so that no single early pass stands for the band either.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from policies._checks import check_int, check_real

__all__ = ["LookupGate"]

# Lookups per band whose median per-request time is the band's measured cost.
MEASURED_LOOKUPS = 16
# Lookups a band must have been timed in before its measured time prices it.
MIN_MEASURED_LOOKUPS = 5


class LookupGate:
    """Per band of batch sizes, an average of what a lookup saved per request.

    Args:
        lookup_s_per_request: the drafter's time to look one request's drafts up, in seconds;
            ``None``: measured, from the times given to :meth:`record_lookup`.
        explore_every: in a band that is being skipped, every this-many-th pass looks up.
        weight: weight of the newest pass in a band's running average.
        min_step_share: a band whose lookups take less than this share of its plain step's
            modelled time is always looked up.
    """

    def __init__(
        self,
        lookup_s_per_request: float | None,
        explore_every: int = 16,
        weight: float = 0.05,
        min_step_share: float = 0.1,
    ) -> None:
        self.lookup_s_per_request = (
            None
            if lookup_s_per_request is None
            else check_real(lookup_s_per_request, "lookup_s_per_request", minimum=0.0)
        )
        self.explore_every = check_int(explore_every, "explore_every", minimum=1)
        self.weight = check_real(weight, "weight", minimum=0.0)
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"weight={weight!r} must be in (0, 1]")
        self.min_step_share = check_real(min_step_share, "min_step_share", minimum=0.0)
        self.saving_per_request: dict[int, float] = {}  # band -> seconds saved per request
        self.plain_step_s: dict[int, float] = {}  # band -> a step's modelled time without drafts
        self._recorded_passes: dict[int, int] = {}  # band -> passes given to record()
        self._skipped_in_a_row: dict[int, int] = {}
        self._lookup_times: dict[int, deque[float]] = {}  # band -> recent s per request
        self.measured_s_per_request: dict[int, float] = {}  # band -> median of those

    @property
    def measures(self) -> bool:
        """Whether the lookup's cost is measured (the drafter must time its lookups)."""
        return self.lookup_s_per_request is None

    @property
    def enabled(self) -> bool:
        """Whether any batch may be skipped: the lookups are measured or priced above 0."""
        return self.lookup_s_per_request is None or self.lookup_s_per_request > 0.0

    def cost_per_request(self, num_requests: int) -> float | None:
        """The lookup's seconds per request in the band of ``num_requests`` (None: not yet
        measured there)."""
        if self.lookup_s_per_request is not None:
            return self.lookup_s_per_request
        return self.measured_s_per_request.get(self.band(num_requests))

    def record_lookup(self, num_requests: int, seconds: float) -> None:
        """The drafter looked up the drafts of ``num_requests`` requests in ``seconds``."""
        if num_requests <= 0:
            return
        band = self.band(num_requests)
        recent = self._lookup_times.setdefault(band, deque(maxlen=MEASURED_LOOKUPS))
        recent.append(seconds / num_requests)
        if len(recent) >= MIN_MEASURED_LOOKUPS:
            self.measured_s_per_request[band] = statistics.median(recent)

    def measured_us_by_band(self) -> dict[str, float]:
        """The measured lookup time per request, in microseconds, of each band that has one,
        keyed by the band's batch sizes (``"16-31"``)."""
        return {
            f"{2**band}-{2 ** (band + 1) - 1}": seconds * 1e6
            for band, seconds in sorted(self.measured_s_per_request.items())
        }

    @staticmethod
    def band(num_requests: int) -> int:
        """The band of a batch of ``num_requests`` (>= 1): floor(log2(num_requests))."""
        return int(math.log2(max(1, num_requests)))

    def should_look_up(self, num_requests: int) -> bool:
        """Whether to look up the drafts of a batch of ``num_requests`` requests."""
        cost = self.cost_per_request(num_requests) if num_requests > 0 else None
        if not cost:  # free, or not yet measured in this band
            return True
        band = self.band(num_requests)
        saving = self.saving_per_request.get(band)
        step_s = self.plain_step_s.get(band, 0.0)
        if saving is None or saving >= cost or num_requests * cost < self.min_step_share * step_s:
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
        passes = self._recorded_passes[band] = self._recorded_passes.get(band, 0) + 1
        weight = max(self.weight, 1.0 / passes)  # a plain mean of the band's first passes
        for averages, value in (
            (self.saving_per_request, saving),
            (self.plain_step_s, plain_step_s),
        ):
            previous = averages.get(band, 0.0)
            averages[band] = previous + weight * (value - previous)
