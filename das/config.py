"""DAS settings: one frozen, validated dataclass, built from keyword arguments or a dict."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POLICIES = ("fixed", "length_class", "cost_model")
WINDOW_RULES = ("appearances", "steps")  # as rollouts.history.WINDOW_RULES
# Forest bytes per token held in history: allocated arrays (nodes, edge table, token pool, with
# their doubling slack) over stored tokens, measured with max_depth 24 on 1.3 M tokens of
# recorded responses (scripts/bench_history_window.py, "bytes_per_token_fill"). The default
# budgets, prompt histories plus global tree, come to 9.5 M tokens: about 2 GB.
HISTORY_BYTES_PER_TOKEN = 224
# lookup_us_per_request's value for "the drafter measures its own lookups".
LOOKUP_MEASURED = "auto"
# lookup_threads's value for "a quarter of the cores this process may run on, at most
# MAX_AUTO_LOOKUP_THREADS": an engine host runs other workers and the engine's own threads.
LOOKUP_THREADS_AUTO = "auto"
MAX_AUTO_LOOKUP_THREADS = 4
# max_spec_factor's value for "by policy and step cost": COST_MODEL_SPEC_FACTOR with the
# cost-model policy while its step cost model has a flat part (knee_tokens > 0, a GPU's decode),
# where the policy can verify positions past a match for almost nothing; 1 (vLLM's suffix
# method's default) otherwise, where the match length is the guard.
SPEC_FACTOR_AUTO = "auto"
COST_MODEL_SPEC_FACTOR = 2.0


@dataclass(frozen=True)
class DASConfig:
    """Settings of the DAS drafter.

    Attributes:
        num_speculative_tokens: upper bound on draft tokens per request per step (vLLM's K).
        max_depth: depth bound of every suffix tree (longest match plus draft). A draft of at
            most ``f`` times its match is at most ``max_depth * f / (1 + f)`` tokens (16 at 24
            with the cost-model policy's factor 2), so a ``num_speculative_tokens`` above that
            needs a deeper tree to be used.
        window_appearances: a prompt's history keeps its rollouts from its last
            ``window_appearances`` appearances (steps in which it was sampled), however many
            steps lie between them: with a large dataset a prompt returns once per epoch.
        window_rule: ``appearances`` (as above) or ``steps`` (legacy: a prompt's history keeps
            only the rollouts of the last ``window_steps`` steps).
        window_steps: the global tree keeps the rollouts of the last ``window_steps`` steps
            (and so do prompt histories under ``window_rule="steps"``).
        min_token_prob: a draft stops when its cumulative probability falls below this.
        use_prompt_history: draft from the tree of the prompt's recent rollouts (with the live
            tokens of sibling samples of the current step).
        use_own_context: draft from the request's own prompt and output.
        use_global_tree: draft from one tree of all recent rollouts of every prompt.
        policy: draft budget policy: ``fixed`` (always K), ``length_class`` (the paper's long /
            medium / short buckets) or ``cost_model`` (maximise expected tokens per unit of
            modelled step time).
        max_history_tokens: bound on tokens kept in all prompts' histories together; the least
            recently seen prompts go first. The forest holds about ``HISTORY_BYTES_PER_TOKEN``
            bytes per stored token: the default budgets (with ``max_global_tokens``) come to
            about 2 GB.
        max_prompt_tokens: bound on one prompt's history; its oldest rollouts go first.
        max_global_tokens: bound on the global tree's tokens; its oldest rollouts go first.
        max_spec_factor: a draft continuing a match of m tokens has at most
            ``m * max_spec_factor`` tokens (as vLLM's suffix method): short matches in unseen
            text draft little, where the tree's count ratios are least trustworthy. ``"auto"``
            (the default): ``COST_MODEL_SPEC_FACTOR`` (2) with the ``cost_model`` policy while
            its step cost model is flat for small steps (``knee_tokens`` > 0, as on a GPU);
            the positions past a draft's match are then calibrated on their own. 1 otherwise
            (see :meth:`spec_factor_for`).
        calibrate: scale each source's draft probabilities by its observed acceptance
            (accepted / expected tokens over recent drafts) before choosing sources and budgets.
        reliability_calibration: with ``calibrate``, also map each draft's predicted cumulative
            acceptance to the rate observed for such predictions (``das.reliability``) before
            the budget policy sees it. Off by default: measured in replays only (see
            docs/long-tail.md), not yet in a live engine.
        max_draft_batch: draft only for batches of at most this many requests (``None``: any
            size). An RL step lasts until its slowest request finishes; in a large batch most
            accepted tokens belong to requests that would not have ended the step, so they save
            little, while verifying them costs the whole batch a slower step. On a machine
            where a step's cost grows from the first token (a CPU), the step's small-batch tail
            is where drafting shortens it.
        lookup_us_per_request: the drafter's own time, in microseconds per request, to look a
            batch's drafts up in the suffix trees. It runs between one engine step and the
            next, in series with the GPU, so the cost-model policy skips the lookups of batch
            sizes whose recent drafts saved less than that time (``das.lookup_gate``).
            ``"auto"`` (the default): the drafter times its own lookups. A number fixes the
            price (``scripts/bench_drafter_time.py`` measures it); 0: lookups are taken as
            free and never skipped. Replays (``das.methods.build_drafter``) take 0 unless told,
            so that their modelled times do not depend on the machine's clock.
        lookup_threads: threads that look a large batch's drafts up together (chunks of at
            least ``suffix_tree.forest.MIN_ROWS_PER_THREAD`` lookups each); the drafts are the
            same whatever the number. ``"auto"`` (the default): a quarter of the cores this
            process may run on, at most ``MAX_AUTO_LOOKUP_THREADS`` (1 on a 2-core machine).
    """

    num_speculative_tokens: int = 16
    max_depth: int = 24
    window_appearances: int = 4
    window_rule: str = "appearances"
    window_steps: int = 5
    min_token_prob: float = 0.1
    use_prompt_history: bool = True
    use_own_context: bool = True
    use_global_tree: bool = True
    policy: str = "cost_model"
    max_history_tokens: int = 8_000_000
    max_prompt_tokens: int = 1_000_000
    max_global_tokens: int = 1_500_000
    max_spec_factor: float | str = SPEC_FACTOR_AUTO
    calibrate: bool = True
    reliability_calibration: bool = False
    max_draft_batch: int | None = None
    lookup_us_per_request: float | str = LOOKUP_MEASURED
    lookup_threads: int | str = LOOKUP_THREADS_AUTO

    def __post_init__(self) -> None:
        for name in (
            "num_speculative_tokens",
            "max_depth",
            "window_appearances",
            "window_steps",
            "max_history_tokens",
            "max_prompt_tokens",
            "max_global_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.window_rule not in WINDOW_RULES:
            raise ValueError(f"window_rule={self.window_rule!r} must be one of {WINDOW_RULES}")
        cap = self.max_draft_batch
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            raise ValueError(f"max_draft_batch={cap!r} must be a positive integer or None")
        if not 0.0 <= float(self.min_token_prob) <= 1.0:
            raise ValueError(f"min_token_prob={self.min_token_prob!r} must be in [0, 1]")
        lookup = self.lookup_us_per_request
        if lookup != LOOKUP_MEASURED and (
            isinstance(lookup, bool) or not isinstance(lookup, (int, float)) or not lookup >= 0
        ):
            raise ValueError(
                f"lookup_us_per_request={lookup!r} must be {LOOKUP_MEASURED!r} or a number >= 0"
            )
        threads = self.lookup_threads
        if threads != LOOKUP_THREADS_AUTO and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0
        ):
            raise ValueError(
                f"lookup_threads={threads!r} must be {LOOKUP_THREADS_AUTO!r} or a positive integer"
            )
        factor = self.max_spec_factor
        if factor != SPEC_FACTOR_AUTO and (
            isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0
        ):
            raise ValueError(
                f"max_spec_factor={factor!r} must be {SPEC_FACTOR_AUTO!r} or a number > 0"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} must be one of {POLICIES}")
        if not (self.use_prompt_history or self.use_own_context or self.use_global_tree):
            raise ValueError(
                "at least one of use_prompt_history, use_own_context, use_global_tree must be true"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DASConfig:
        """Build from a mapping, naming any unknown key (as vLLM's own configs do)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DAS config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @property
    def lookup_s_per_request(self) -> float | None:
        """``lookup_us_per_request`` in seconds; ``None`` when the drafter measures it."""
        if self.lookup_us_per_request == LOOKUP_MEASURED:
            return None
        return float(self.lookup_us_per_request) * 1e-6

    @property
    def spec_factor(self) -> float:
        """The largest ``max_spec_factor`` this config may draft with (``"auto"``: by
        ``policy`` alone)."""
        if self.max_spec_factor == SPEC_FACTOR_AUTO:
            return COST_MODEL_SPEC_FACTOR if self.policy == "cost_model" else 1.0
        return float(self.max_spec_factor)

    def spec_factor_for(self, knee_tokens: float | None) -> float:
        """``max_spec_factor`` for a step whose cost model has ``knee_tokens`` (None: no cost
        model): ``"auto"`` drafts past matches only where the cost is flat (a knee > 0)."""
        if self.max_spec_factor == SPEC_FACTOR_AUTO and not (knee_tokens and knee_tokens > 0):
            return 1.0
        return self.spec_factor

    @property
    def num_lookup_threads(self) -> int:
        """``lookup_threads`` as a number of threads (``"auto"`` resolved on this machine)."""
        if self.lookup_threads != LOOKUP_THREADS_AUTO:
            return int(self.lookup_threads)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(MAX_AUTO_LOOKUP_THREADS, (cores or 1) // 4))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
