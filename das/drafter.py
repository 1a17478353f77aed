"""The DAS drafter: suffix trees over recent rollouts of the same prompt, plus a budget policy.

Any engine drives it through one lifecycle per request::

    drafter.begin_step(step)                       # once per RL step (one generate() call)
    key = drafter.start_request(rid, prompt_tokens, prompt_key=None)
    proposal = drafter.propose([rid, ...])         # every decode iteration
    drafter.extend_request(rid, accepted_tokens)   # tokens the target accepted
    drafter.finish_request(rid, "stop")            # or abort_request(rid)

Draft sources per request (best score wins, see ``SOURCES``): the prompt's history tree (recent
steps' responses plus live tokens of this step's sibling samples), the global tree of all recent
responses, and the request's own prompt + output. Only rollouts that truly finished (stop or
length) enter history; aborted ones are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from das.config import DASConfig
from das.lookup_gate import LookupGate
from das.reliability import ReliabilityCalibration
from policies.budget import BatchView, BudgetPolicy, LengthClass, LengthClassPolicy
from policies.cost_model import OnlineCostFitter, StepCostModel
from rollouts.history import GLOBAL_TREE, HistoryStore, prompt_tree
from rollouts.trace import prompt_key_for
from suffix_tree import SuffixForest
from suffix_tree.draft import DraftBatch
from suffix_tree.validation import to_token_array

logger = logging.getLogger(__name__)

SOURCES = ("prompt", "global", "own")  # order = preference on equal scores
FINISHED_REASONS = ("stop", "length")
STEP_STATS_KEPT = 64  # DrafterStats.by_step keeps the counts of this many recent steps


@dataclass(frozen=True, slots=True)
class Proposal:
    """Drafts for a batch, already cut to the policy's budgets."""

    drafts: DraftBatch
    sources: np.ndarray  # int8 [rows]: index into SOURCES, -1 for an empty draft
    budgets: np.ndarray  # int64 [rows]

    def draft_tokens(self) -> list[list[int]]:
        """Drafts as vLLM wants them: one list of token ids per row."""
        tokens = self.drafts.tokens
        return [tokens[i, :n].tolist() for i, n in enumerate(self.drafts.num_tokens)]


@dataclass(slots=True)
class _Request:
    prompt_key: str
    own_id: tuple
    live_id: tuple | None
    num_prompt_tokens: int
    # Forest handles, fixed while the request runs (its sequences and trees are removed only
    # when it finishes or aborts; history holds its prompt tree until then): -1 where absent.
    own_slot: int
    own_root: int
    live_slot: int
    prompt_root: int
    num_generated: int = 0
    # The last draft proposed and not yet resolved by extend: row pending_row of pending.
    pending: _Proposed | None = None
    pending_row: int = 0

    @property
    def pending_cumulative(self) -> np.ndarray | None:
        """The pending draft's cumulative acceptance, per position, as the (source, bucket)
        factors predicted it (None: no draft pending)."""
        if self.pending is None:
            return None
        num = self.pending.drafts.num_tokens[self.pending_row]
        return self.pending.predicted[self.pending_row, :num]


@dataclass(frozen=True, slots=True)
class _Proposed:
    """What one ``propose`` call drafted, kept until ``extend`` scores it. Row i: request i of
    the batch; every array has ``num_speculative_tokens`` columns. Copies of what the call's
    :class:`Proposal` holds: the caller may write those (the engine's fault injection does)."""

    drafts: DraftBatch  # num_tokens already cut to the budgets
    sources: np.ndarray  # int8 [rows]: index into SOURCES
    buckets: np.ndarray  # int64 [rows]: match-length bucket
    # Cumulative acceptance as the (source, bucket) factors predicted it, per position.
    predicted: np.ndarray  # float64 [rows, K]


NUM_MATCH_BUCKETS = 5  # match lengths 1, 2-3, 4-7, 8-15, 16+


def match_bucket(match_lens: np.ndarray) -> np.ndarray:
    """Bucket of a match length: floor(log2(m)), capped."""
    return np.minimum(np.log2(np.maximum(match_lens, 1)).astype(np.int64), NUM_MATCH_BUCKETS - 1)


class AcceptanceCalibration:
    """Per (source, match-length bucket): a factor on each draft token's conditional probability.

    The tree's count ratios are overconfident where counts are small (a count-1 chain says
    probability 1), and how much so depends on the source and on how long the match was: a
    one-token match in unseen text is noise, a 16-token match in the prompt's history is not.
    Draft tokens are verified in order until the first rejection, so the model is: token i is
    accepted with probability ``min(1, f * p_i)`` given the ones before it. ``f`` is estimated
    as accepted tokens / the sum of raw ``p_i`` over the positions actually tried (the accepted
    ones and the first rejected one). A bucket with little data shrinks toward its source's
    overall factor, and that toward 1. Sums decay every step, so buckets that stopped being
    drafted drift back and get explored again.

    A draft longer than its match (``max_spec_factor`` > 1) continues past what the match
    vouches for; its positions from the match length on have factors of their own
    (:meth:`beyond_factors`), estimated the same way and shrunk toward the bucket's factor.
    With drafts no longer than their matches those sums stay 0 and nothing changes.
    """

    def __init__(self, num_sources: int, prior: float = 8.0, decay: float = 0.5) -> None:
        self.prior = prior
        self.decay = decay
        self.accepted = np.zeros((num_sources, NUM_MATCH_BUCKETS))
        self.expected = np.zeros((num_sources, NUM_MATCH_BUCKETS))
        # The same sums for the draft positions at or past the match length.
        self.accepted_beyond = np.zeros((num_sources, NUM_MATCH_BUCKETS))
        self.expected_beyond = np.zeros((num_sources, NUM_MATCH_BUCKETS))

    def factors(self) -> np.ndarray:
        """[source, bucket] multipliers of conditional draft-token probabilities."""
        per_source = (self.accepted.sum(axis=1) + self.prior) / (
            self.expected.sum(axis=1) + self.prior
        )
        return (self.accepted + self.prior * per_source[:, None]) / (self.expected + self.prior)

    def beyond_factors(self, factors: np.ndarray) -> np.ndarray:
        """[source, bucket] multipliers for draft positions past the match length, shrunk
        toward ``factors`` (those of :meth:`factors`)."""
        return (self.accepted_beyond + self.prior * factors) / (self.expected_beyond + self.prior)

    @staticmethod
    def position_factors(
        factors: np.ndarray,
        beyond: np.ndarray,
        sources: np.ndarray,
        buckets: np.ndarray,
        match_lens: np.ndarray,
        width: int,
    ) -> np.ndarray:
        """[rows, width] factor of each draft position: the row's (source, bucket) factor
        before its match length, its beyond factor from there on."""
        past = np.arange(width)[None, :] >= match_lens[:, None]
        return np.where(past, beyond[sources, buckets][:, None], factors[sources, buckets][:, None])

    @staticmethod
    def calibrate(probs: np.ndarray, factors: np.ndarray) -> np.ndarray:
        """[rows, K] calibrated cumulative probabilities from raw conditional ``probs`` (0 past
        each draft) and one factor per row (1-D) or per position (2-D)."""
        per_position = factors if factors.ndim == 2 else factors[:, None]
        return np.cumprod(np.minimum(probs * per_position, 1.0), axis=1)

    def new_step(self) -> None:
        for sums in (self.accepted, self.expected, self.accepted_beyond, self.expected_beyond):
            sums *= self.decay


@dataclass
class DrafterStats:
    """Counters since the drafter was built."""

    num_proposals: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    wins_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    tokens_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    num_failures: int = 0
    # Batches whose drafts were not looked up: the policy could give none a budget.
    num_skipped_batches: int = 0
    # Batches not looked up because recent lookups at their size saved less than they cost.
    num_gated_batches: int = 0
    # Per length class of the request's prompt (long/medium/short): rows given a draft, draft
    # tokens, accepted tokens.
    drafts_by_class: dict[str, int] = field(default_factory=lambda: _per_class())
    draft_tokens_by_class: dict[str, int] = field(default_factory=lambda: _per_class())
    accepted_by_class: dict[str, int] = field(default_factory=lambda: _per_class())
    # The same three counts per RL step (key: step number; the last STEP_STATS_KEPT steps) and
    # per prompt key in the current step (cleared when a step begins: over a run of thousands
    # of steps and tens of thousands of prompts, a table of every step or prompt would only grow).
    by_step: dict[int, dict[str, int]] = field(default_factory=dict)
    by_prompt: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, step: int, prompt_key: str, length_class: str, **amounts: int) -> None:
        """Add ``amounts`` (drafts, draft_tokens, accepted) to the class, step and prompt."""
        self.count_rows(step, [prompt_key], [length_class], **{n: [a] for n, a in amounts.items()})

    def count_rows(
        self,
        step: int,
        prompt_keys: Sequence[str],
        length_classes: Sequence[str],
        **amounts: Sequence[int] | np.ndarray,
    ) -> None:
        """:meth:`count` for many rows at once: row i adds ``amounts[name][i]`` to the counts
        of ``prompt_keys[i]``, ``length_classes[i]`` and the step."""
        per_class = {
            "drafts": self.drafts_by_class,
            "draft_tokens": self.draft_tokens_by_class,
            "accepted": self.accepted_by_class,
        }
        step_counts = self.by_step.setdefault(step, _counts())
        by_prompt = self.by_prompt
        for name, values in amounts.items():
            column = values.tolist() if isinstance(values, np.ndarray) else list(values)
            step_counts[name] += sum(column)
            class_counts = per_class[name]
            for key, length_class, amount in zip(prompt_keys, length_classes, column, strict=True):
                counts = by_prompt.get(key)
                if counts is None:
                    counts = by_prompt[key] = _counts()
                counts[name] += amount
                class_counts[length_class] += amount


def _counts() -> dict[str, int]:
    return {"drafts": 0, "draft_tokens": 0, "accepted": 0}


def _per_class() -> dict[str, int]:
    return {length_class.value: 0 for length_class in LengthClass}


class DASDrafter:
    """Drafts from the rollouts that the same prompts produced in recent steps."""

    def __init__(
        self,
        config: DASConfig | None = None,
        policy: BudgetPolicy | None = None,
        cost: StepCostModel | OnlineCostFitter | None = None,
        length_classes: LengthClassPolicy | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``policy`` sets per-request budgets each iteration (None: always the full K), with
        ``cost`` as its step cost model; ``length_classes`` ranks prompts by history length;
        ``clock`` times the lookups when ``config.lookup_us_per_request`` is ``"auto"``."""
        self.config = config or DASConfig()
        self._clock = clock
        self.policy = policy
        self.cost = cost
        self.length_classes = length_classes or LengthClassPolicy()
        self._class_of: dict[str, LengthClass] = {}
        self._mean_length_of: dict[str, float] = {}  # history's mean lengths, per step
        self.forest = SuffixForest(max_depth=self.config.max_depth)
        self.history = HistoryStore(
            self.forest,
            window_steps=self.config.window_steps,
            use_global_tree=self.config.use_global_tree,
            max_tokens=self.config.max_history_tokens,
            window_appearances=self.config.window_appearances,
            window_rule=self.config.window_rule,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_global_tokens=self.config.max_global_tokens,
            use_prompt_trees=self.config.use_prompt_history,
        )
        self.step = 0
        self.stats = DrafterStats()
        self._requests: dict[Hashable, _Request] = {}
        self._num_started = 0
        self.calibration = AcceptanceCalibration(len(SOURCES))
        self.reliability = ReliabilityCalibration()
        # Whether verified drafts feed the reliability map's statistics: only where the map is
        # applied (a benchmark may turn it on to watch the map without applying it).
        self.record_reliability = self.config.calibrate and self.config.reliability_calibration
        self.lookup_gate = LookupGate(self.config.lookup_s_per_request)
        self._lookup_threads = self.config.num_lookup_threads
        # (requests, plain step s, step s with the verified drafts) of the last looked-up
        # batch, until its outcome reaches the gate.
        self._gate_pending: tuple[int, float, float] | None = None
        enabled = (
            self.config.use_prompt_history,
            self.config.use_global_tree,
            self.config.use_own_context,
        )
        self._enabled_sources = [i for i, on in enumerate(enabled) if on]
        # Whether any draft may be longer than its match (then verified positions past the match
        # are scored apart: AcceptanceCalibration.beyond_factors); each propose call decides
        # from its cost model whether its own drafts may (DASConfig.spec_factor_for).
        self._drafts_pass_matches = self.config.spec_factor > 1.0

    # ------------------------------------------------------------------------ lifecycle
    def begin_step(self, step: int | None = None) -> int:
        """Start RL step ``step`` (default: the next one); evicts history outside the window."""
        self.step = self.step + 1 if step is None else int(step)
        self.stats.by_prompt.clear()
        for old_step in [s for s in self.stats.by_step if s <= self.step - STEP_STATS_KEPT]:
            del self.stats.by_step[old_step]
        self.history.begin_step(self.step)
        self.calibration.new_step()
        self.reliability.new_step()
        self._mean_length_of = self.history.mean_lengths()
        self._class_of = self.length_classes.classify(self._mean_length_of)
        return self.step

    def start_request(
        self,
        request_id: Hashable,
        prompt_tokens: Iterable[int] | np.ndarray,
        prompt_key: str | None = None,
    ) -> str:
        """Register a request; returns its prompt key (a hash of the prompt unless given)."""
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already running")
        prompt = to_token_array(prompt_tokens, "prompt_tokens")
        if prompt.size == 0:
            raise ValueError(f"request_id={request_id!r} has an empty prompt")
        key = prompt_key if prompt_key is not None else prompt_key_for(prompt)
        own_id = ("own", request_id)
        self.forest.append(own_id, prompt, tree=own_id)
        self.history.hold(key)  # released in finish_request / _discard
        live_id = None
        live_slot = -1
        if self.config.use_prompt_history:
            live_id = ("live", self._num_started)  # unique even if an engine reuses ids
            self.forest.append(live_id, (), tree=prompt_tree(key))
            live_slot = self.forest.sequence_handle(live_id)
        self._num_started += 1
        self._requests[request_id] = _Request(
            prompt_key=key,
            own_id=own_id,
            live_id=live_id,
            num_prompt_tokens=int(prompt.size),
            own_slot=self.forest.sequence_handle(own_id),
            own_root=self.forest.tree_handle(own_id),
            live_slot=live_slot,
            prompt_root=self.forest.tree_handle(prompt_tree(key)),
        )
        return key

    def extend_request(self, request_id: Hashable, tokens: Iterable[int] | np.ndarray) -> None:
        """Append tokens the target produced (accepted drafts and the bonus token)."""
        self.extend_many([request_id], [tokens])

    def extend_many(
        self, request_ids: Sequence[Hashable], tokens: Sequence[Iterable[int] | np.ndarray]
    ) -> None:
        """:meth:`extend_request` for many requests in one kernel call."""
        if len(request_ids) != len(tokens):
            raise ValueError(f"{len(request_ids)} request ids but {len(tokens)} token lists")
        arrays = [t if _is_token_vector(t) else to_token_array(t, "tokens") for t in tokens]
        # Every token checked at once (negative ids, ids beyond int32) before anything is
        # recorded; the kernels get int32.
        joined = to_token_array(
            np.concatenate(arrays) if arrays else np.zeros(0, np.int32), "tokens"
        )
        requests = [self._request(rid) for rid in request_ids]
        accepted = self._resolve_pending(requests, arrays)
        if self._gate_pending is not None:
            num_requests, plain_s, drafted_s = self._gate_pending
            self.lookup_gate.record(num_requests, accepted, plain_s, drafted_s)
            self._gate_pending = None
        if not requests:
            return
        sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
        for request, size in zip(requests, sizes.tolist(), strict=True):
            request.num_generated += size
        slots = np.fromiter((r.own_slot for r in requests), np.int64, len(requests))
        offsets = np.zeros(len(requests) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if self.config.use_prompt_history:  # every request's live sequence grows too
            live = np.fromiter((r.live_slot for r in requests), np.int64, len(requests))
            slots = np.concatenate([slots, live])
            offsets = np.concatenate([offsets, offsets[1:] + offsets[-1]])
            joined = np.concatenate([joined, joined])
        self.forest.append_many(slots, joined, offsets)

    def _resolve_pending(self, requests: list[_Request], produced: list[np.ndarray]) -> int:
        # Score each request's last draft against what the target produced: the accepted
        # prefix feeds the stats and the calibration of the draft's (source, bucket). Returns
        # the accepted draft tokens.
        rows = [i for i, r in enumerate(requests) if r.pending is not None]
        if not rows:
            return 0
        scored = [requests[i] for i in rows]
        k = self.config.num_speculative_tokens
        proposed = scored[0].pending
        if all(r.pending is proposed for r in scored):  # the usual case: one propose call
            index = np.fromiter((r.pending_row for r in scored), np.int64, len(scored))
            drafts = proposed.drafts.rows(index)
            sources = proposed.sources[index]
            buckets = proposed.buckets[index]
            predicted = proposed.predicted[index]
        else:
            per_request = (r.pending.drafts.rows(r.pending_row).arrays() for r in scored)
            drafts = DraftBatch(*(np.stack(column) for column in zip(*per_request, strict=True)))
            sources = np.array([r.pending.sources[r.pending_row] for r in scored])
            buckets = np.array([r.pending.buckets[r.pending_row] for r in scored])
            predicted = np.stack([r.pending.predicted[r.pending_row] for r in scored])
        num = drafts.num_tokens
        within = np.arange(k)[None, :] < num[:, None]
        truth = np.full((len(scored), k), -2, np.int64)
        for row, i in enumerate(rows):
            n = min(k, produced[i].size)
            truth[row, :n] = produced[i][:n]
        accepted = np.cumprod(np.where(within, drafts.tokens, -1) == truth, axis=1).sum(axis=1)
        # The positions tried, the accepted ones and the first reject, and their raw mass.
        tried = np.minimum(accepted + 1, num)
        probs = drafts.probs
        expected = np.array([probs[row, :t].sum() for row, t in enumerate(tried.tolist())])
        within_accepted, within_expected = accepted, expected
        if self._drafts_pass_matches:
            within_accepted, within_expected = self._score_past_matches(
                drafts, sources, buckets, accepted, expected, tried
            )
        np.add.at(self.calibration.accepted, (sources, buckets), within_accepted)
        np.add.at(self.calibration.expected, (sources, buckets), within_expected)
        if self.record_reliability:
            self.reliability.record_rows(predicted, num, accepted)
        self.stats.num_accepted_tokens += int(accepted.sum())
        self.stats.count_rows(
            self.step,
            [r.prompt_key for r in scored],
            self._class_values(scored),
            accepted=accepted,
        )
        for request in scored:
            request.pending = None
        return int(accepted.sum())

    def _score_past_matches(
        self,
        drafts: DraftBatch,
        sources: np.ndarray,
        buckets: np.ndarray,
        accepted: np.ndarray,
        expected: np.ndarray,
        tried: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Adds the tried positions at or past each draft's match length to the calibration's
        beyond sums; returns the accepted tokens and raw probability mass of those before it.

        The first ``tried`` positions of a draft are its accepted ones and the first rejected
        one, so a draft reaches past its match length m only if it had at least m accepted.
        """
        match = drafts.match_lens
        past = np.flatnonzero(tried > match)
        if not past.size:
            return accepted, expected
        past_accepted = accepted[past] - match[past]
        past_expected = np.array(
            [
                drafts.probs[row, start:end].sum()
                for row, start, end in zip(
                    past.tolist(), match[past].tolist(), tried[past].tolist(), strict=True
                )
            ]
        )
        index = (sources[past], buckets[past])
        np.add.at(self.calibration.accepted_beyond, index, past_accepted)
        np.add.at(self.calibration.expected_beyond, index, past_expected)
        within_accepted = accepted.copy()
        within_accepted[past] -= past_accepted
        within_expected = expected.copy()
        within_expected[past] -= past_expected
        return within_accepted, within_expected

    def finish_request(
        self,
        request_id: Hashable,
        finish_reason: str,
        stop_token_ids: Iterable[int] = (),
    ) -> None:
        """End a request. ``stop``/``length`` rollouts enter history, anything else is dropped.

        Tokens after the first stop token are trimmed before the rollout is kept.
        """
        request = self._requests.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id={request_id!r} is not running")
        if finish_reason not in FINISHED_REASONS:
            self._discard(request)
            return
        try:
            own = self.forest.sequence_tokens(request.own_id)
            response = own[request.num_prompt_tokens :]
            stops = np.flatnonzero(np.isin(response, np.fromiter(stop_token_ids, dtype=np.int64)))
            if stops.size:
                response = response[: stops[0] + 1]
            self.forest.drop_tree(request.own_id)
            if request.live_id is not None and len(response) == self.forest.sequence_length(
                request.live_id
            ):
                self.history.adopt_live(request.prompt_key, self.step, request.live_id)
            else:
                if request.live_id is not None:
                    self.forest.remove(request.live_id)
                self.history.add_rollout(request.prompt_key, self.step, response)
        finally:  # the request has left: its prompt tree may go once its history empties
            self.history.release(request.prompt_key)

    def abort_request(self, request_id: Hashable) -> None:
        """Drop a request that did not finish (aborted, preempted for good): no history."""
        request = self._requests.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id={request_id!r} is not running")
        self._discard(request)

    def _discard(self, request: _Request) -> None:
        self.forest.drop_tree(request.own_id)
        if request.live_id is not None:
            self.forest.remove(request.live_id)
        self.history.release(request.prompt_key)

    def _request(self, request_id: Hashable) -> _Request:
        request = self._requests.get(request_id)
        if request is None:
            raise ValueError(f"request_id={request_id!r} is not running")
        return request

    @property
    def num_running(self) -> int:
        return len(self._requests)

    def check_integrity(self) -> None:
        """Walk every tree (slow) and check that the forest holds what history says it holds.

        With no request running, the forest's sequences are exactly history's, and their tokens
        are history's count: a finished or aborted request that left a sequence behind fails.
        Raises ``AssertionError`` naming the first inconsistency.
        """
        self.forest.check_integrity()
        held = self.history.held_sequence_ids()
        stored = sum(self.forest.sequence_length(seq_id) for seq_id in held)
        if stored != self.history.num_stored_tokens:
            raise AssertionError(
                f"history counts {self.history.num_stored_tokens} tokens, its sequences "
                f"hold {stored}"
            )
        if not self._requests and self.forest.num_sequences != len(held):
            raise AssertionError(
                f"no request running, yet the forest holds {self.forest.num_sequences} "
                f"sequences and history {len(held)}"
            )

    def prompt_key(self, request_id: Hashable) -> str:
        return self._request(request_id).prompt_key

    # ------------------------------------------------------------------------- drafting
    def propose(
        self, request_ids: Sequence[Hashable], max_tokens: np.ndarray | int | None = None
    ) -> Proposal:
        """Drafts for a batch: best source per request, cut to the policy's budgets.

        ``max_tokens`` caps each request's draft (default: ``num_speculative_tokens``). A batch
        of more than ``config.max_draft_batch`` requests gets empty drafts without drafting.
        Any failure inside the drafter gives empty drafts (no speculation), never a wrong token.
        """
        rows = len(request_ids)
        k = self.config.num_speculative_tokens
        if self.config.max_draft_batch is not None and rows > self.config.max_draft_batch:
            return _empty_proposal(rows, k)
        caps = (
            np.full(rows, k, np.int64)
            if max_tokens is None
            else np.broadcast_to(
                np.minimum(np.asarray(max_tokens, dtype=np.int64), k), (rows,)
            ).copy()
        )
        try:
            return self._propose(request_ids, caps)
        except Exception:
            self.stats.num_failures += 1
            logger.exception("DAS drafter failed; no speculation for this batch")
            return _empty_proposal(rows, k)

    def _propose(self, request_ids: Sequence[Hashable], caps: np.ndarray) -> Proposal:
        rows = len(request_ids)
        k = self.config.num_speculative_tokens
        requests = [self._request(rid) for rid in request_ids]
        cost = self.cost.model if isinstance(self.cost, OnlineCostFitter) else self.cost
        shape = None
        # Only a budget policy with a cost model consults the gate, so only its lookups are
        # timed, from here: what a gated batch would not have spent.
        gated = self.policy is not None and cost is not None
        timed = gated and self.lookup_gate.measures
        lookup_started = self._clock() if timed else 0.0
        if self.policy is not None and rows:
            if gated and not self.lookup_gate.should_look_up(rows):
                # Recent lookups of batches this size saved less than the lookups took.
                self.stats.num_gated_batches += 1
                return _empty_proposal(rows, k)
            shape = self._batch_view(requests, np.zeros((rows, 0)))
            if not self.policy.may_draft(shape, caps, cost):
                # No draft of this batch could get a budget: skip the tree lookups.
                self.stats.num_skipped_batches += 1
                return _empty_proposal(rows, k)
        context_slots = np.fromiter((r.own_slot for r in requests), np.int64, rows)
        spec_factor = self.config.spec_factor_for(None if cost is None else cost.knee_tokens)
        looked_up = self._look_up(requests, context_slots, caps, spec_factor)
        enabled = self._enabled_sources
        # Row n * rows + i of the lookup: request i's draft from source enabled[n].
        source_of_row = np.repeat(enabled, rows)
        factors = self.calibration.factors()
        # Positions past a match exist only where this call's drafts may outrun their matches.
        beyond = self.calibration.beyond_factors(factors) if spec_factor > 1.0 else None
        row_factors = self._draft_factors(
            factors, beyond, source_of_row, match_bucket(looked_up.match_lens), looked_up
        )
        scores = np.full((len(SOURCES), rows), -1.0)
        scores[enabled] = self._calibrated(looked_up, row_factors).sum(axis=1).reshape(-1, rows)
        batches: list[DraftBatch | None] = [None] * len(SOURCES)
        for n, source in enumerate(enabled):
            batches[source] = looked_up.rows(slice(n * rows, (n + 1) * rows))
        chosen = self._choose_sources(batches, scores)
        position = np.zeros(len(SOURCES), np.int64)
        position[enabled] = np.arange(len(enabled))
        drafts = looked_up.rows(position[chosen] * rows + np.arange(rows)).widened(k)
        buckets = match_bucket(drafts.match_lens)
        # Calibrated cumulative acceptance probabilities: what the policy decides from.
        predicted = self._calibrated(
            drafts, self._draft_factors(factors, beyond, chosen, buckets, drafts)
        )
        cumulative = predicted
        if self.config.calibrate and self.config.reliability_calibration:
            cumulative = self.reliability.apply(predicted)
        sources = np.where(drafts.num_tokens > 0, chosen, -1).astype(np.int8)
        budgets = caps
        if shape is not None:
            batch = replace(shape, cumulative_probs=cumulative)
            budgets = np.asarray(self.policy.batch_budgets(batch, cost), dtype=np.int64)
            budgets = np.minimum(budgets, caps)
        np.minimum(drafts.num_tokens, budgets, out=drafts.num_tokens)
        sources[drafts.num_tokens == 0] = -1
        if shape is not None and gated and self.lookup_gate.enabled:
            drafted = int(drafts.num_tokens.sum())
            reads = float(shape.context_tokens.sum())
            plain_s, drafted_s = cost.step_times(
                [rows, rows + drafted], reads, [0, drafted], kv_tokens=reads
            ).tolist()
            self._gate_pending = (rows, plain_s, drafted_s)
        kept = DraftBatch(
            drafts.tokens.copy(),
            drafts.probs.copy(),
            drafts.num_tokens.copy(),
            drafts.scores,
            drafts.match_lens,
        )
        proposed = _Proposed(kept, sources.copy(), buckets, predicted)
        for i in np.flatnonzero(sources >= 0).tolist():
            request = requests[i]
            request.pending = proposed
            request.pending_row = i
        self._count(requests, drafts, sources)
        if timed:
            self.lookup_gate.record_lookup(rows, self._clock() - lookup_started)
        return Proposal(drafts, sources, budgets)

    def _look_up(
        self,
        requests: list[_Request],
        context_slots: np.ndarray,
        caps: np.ndarray,
        spec_factor: float,
    ) -> DraftBatch:
        """The drafts of ``requests`` from every enabled source's tree, in one lookup: row
        ``n * len(requests) + i`` holds request i's draft from source ``_enabled_sources[n]``."""
        roots, match_slots = self._lookup_trees(requests, context_slots)
        enabled = self._enabled_sources
        return self.forest.speculate_many(
            roots,
            np.tile(context_slots, len(enabled)),
            np.tile(caps, len(enabled)),
            min_token_prob=self.config.min_token_prob,
            max_spec_factor=spec_factor,
            threads=self._lookup_threads,
            match_slots=match_slots,
        )

    def _lookup_trees(
        self, requests: list[_Request], context_slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The tree (root) and match slot of each row of :meth:`_look_up`."""
        rows = len(requests)
        enabled = self._enabled_sources
        roots = np.empty(len(enabled) * rows, np.int64)
        # The sequence whose stored suffixes give each row's matches without walking the tree:
        # the request's own in its own tree, its live one in its prompt's (once it ends with
        # the context; the kernel checks), none in the global tree.
        match_slots = np.full(len(enabled) * rows, -1, np.int64)
        for n, source in enumerate(enabled):
            part = roots[n * rows : (n + 1) * rows]
            if SOURCES[source] == "global":
                part[:] = self.forest.tree_handle(GLOBAL_TREE)
            elif SOURCES[source] == "prompt":
                part[:] = [r.prompt_root for r in requests]
                match_slots[n * rows : (n + 1) * rows] = [r.live_slot for r in requests]
            else:
                part[:] = [r.own_root for r in requests]
                match_slots[n * rows : (n + 1) * rows] = context_slots
        return roots, match_slots

    def _choose_sources(self, batches: list[DraftBatch | None], scores: np.ndarray) -> np.ndarray:
        """Per row, the index in ``SOURCES`` of the draft to verify: the best calibrated score
        (``scores[source, row]``, -1 for a disabled source), the first maximum on ties. A
        subclass may choose otherwise (the policy-ceiling benchmark's oracle does)."""
        return np.argmax(scores, axis=0)

    def _length_class(self, request: _Request) -> LengthClass:
        return self._class_of.get(request.prompt_key, self.length_classes.unknown_class)

    def _draft_factors(
        self,
        factors: np.ndarray,
        beyond: np.ndarray | None,
        sources: np.ndarray,
        buckets: np.ndarray,
        batch: DraftBatch,
    ) -> np.ndarray:
        """The calibration factors of ``batch``'s drafts from ``sources`` (match-length
        ``buckets``): one per row, or one per position where drafts may outrun their matches
        (``beyond`` given)."""
        if beyond is None:
            return factors[sources, buckets]
        return self.calibration.position_factors(
            factors, beyond, sources, buckets, batch.match_lens, batch.probs.shape[1]
        )

    def _calibrated(self, batch: DraftBatch, row_factors: np.ndarray) -> np.ndarray:
        if not self.config.calibrate:
            return batch.cumulative_probs()
        return self.calibration.calibrate(batch.masked_probs(), row_factors)

    def _batch_view(self, requests: list[_Request], cumulative: np.ndarray) -> BatchView:
        rows = len(requests)
        return BatchView(
            generated_tokens=np.fromiter((r.num_generated for r in requests), np.int64, rows),
            cumulative_probs=cumulative,
            length_classes=[self._length_class(r) for r in requests],
            expected_lengths=np.array(
                [self._mean_length_of.get(r.prompt_key, np.nan) for r in requests]
            ),
            context_tokens=np.fromiter(
                (r.num_prompt_tokens + r.num_generated for r in requests), np.int64, rows
            ),
        )

    def _count(self, requests: list[_Request], drafts: DraftBatch, sources: np.ndarray) -> None:
        self.stats.num_proposals += len(drafts)
        self.stats.num_draft_tokens += int(drafts.num_tokens.sum())
        drafting = np.flatnonzero(drafts.num_tokens > 0)
        if drafting.size:
            counted = [requests[i] for i in drafting.tolist()]
            self.stats.count_rows(
                self.step,
                [r.prompt_key for r in counted],
                self._class_values(counted),
                drafts=np.ones(drafting.size, np.int64),
                draft_tokens=drafts.num_tokens[drafting],
            )
        # Index 0 of the bincounts: rows without a draft (source -1).
        wins = np.bincount(sources + 1, minlength=len(SOURCES) + 1).tolist()
        tokens = np.bincount(sources + 1, drafts.num_tokens, len(SOURCES) + 1).tolist()
        for index, name in enumerate(SOURCES):
            self.stats.wins_by_source[name] += wins[index + 1]
            self.stats.tokens_by_source[name] += int(tokens[index + 1])

    def _class_values(self, requests: list[_Request]) -> list[str]:
        """The length class (its value) of each request's prompt."""
        return [self._length_class(r).value for r in requests]


def _is_token_vector(tokens: object) -> bool:
    """Whether ``tokens`` is already a 1-D int32 or int64 array (checked with the others)."""
    return type(tokens) is np.ndarray and tokens.ndim == 1 and tokens.dtype in (np.int32, np.int64)


def _empty_proposal(rows: int, k: int) -> Proposal:
    empty = DraftBatch(
        np.zeros((rows, k), np.int32),
        np.zeros((rows, k), np.float64),
        np.zeros(rows, np.int64),
        np.zeros(rows, np.float64),
        np.zeros(rows, np.int64),
    )
    return Proposal(empty, np.full(rows, -1, np.int8), np.zeros(rows, np.int64))
