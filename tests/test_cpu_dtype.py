"""The engine dtype picked by the machine: bfloat16 only where the CPU computes it natively."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from das.vllm import engine
from das.vllm.engine import choose_dtype, cpu_description, read_cpu_flags, resolve_dtype

# Flag sets as /proc/cpuinfo spells them (abridged).
AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma", "bmi2", "sha_ni"}  # AMD EPYC (Zen 2/3)
AVX512_NO_BF16 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # Cascade Lake
COOPER_LAKE = AVX512_NO_BF16 | {"avx512_bf16"}
SAPPHIRE_RAPIDS = COOPER_LAKE | {"amx_bf16", "amx_int8", "amx_tile"}
AMX_ONLY = AVX512_NO_BF16 | {"amx_bf16"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_EPYC, "float32"),
        (AVX512_NO_BF16, "float32"),  # AVX-512 alone still emulates bfloat16
        (set(), "float32"),  # no /proc/cpuinfo (another OS): the safe choice
        (COOPER_LAKE, "bfloat16"),
        (AMX_ONLY, "bfloat16"),
        (SAPPHIRE_RAPIDS, "bfloat16"),
    ],
)
def test_auto_follows_the_cpu_flags(flags: set[str], expected: str) -> None:
    dtype, reason = choose_dtype("auto", flags, cuda=False)
    assert dtype == expected
    if expected == "float32":
        assert "lacks avx512_bf16 and amx_bf16" in reason
    else:
        assert "native bfloat16" in reason


def test_auto_names_the_flags_it_found() -> None:
    assert "amx_bf16, avx512_bf16" in choose_dtype("auto", SAPPHIRE_RAPIDS, cuda=False)[1]
    assert choose_dtype("auto", AMX_ONLY, cuda=False)[1].endswith("(amx_bf16)")


def test_auto_on_a_gpu_is_bfloat16_whatever_the_cpu() -> None:
    assert choose_dtype("auto", AVX2_EPYC, cuda=True) == ("bfloat16", "a CUDA device is present")


@pytest.mark.parametrize("requested", ["bfloat16", "float16", "float32"])
def test_an_explicit_dtype_is_kept(requested: str) -> None:
    for flags in (AVX2_EPYC, SAPPHIRE_RAPIDS):
        assert choose_dtype(requested, flags, cuda=False)[0] == requested


def test_an_unknown_dtype_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"dtype='fp8' must be one of \['auto', 'bfloat16'"):
        choose_dtype("fp8", SAPPHIRE_RAPIDS, cuda=False)


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n"
        "bugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    assert read_cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16", "avx512_bf16"}
    assert read_cpu_flags(tmp_path / "absent") == frozenset()
    # The name benchmarks give the machine: model and the wide-vector flags it has.
    assert cpu_description(cpuinfo) == "Some CPU (avx512_bf16, amx_bf16)"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert cpu_description(cpuinfo) == "Old CPU (no AVX-512)"


def test_resolve_logs_the_dtype_and_why(monkeypatch, caplog) -> None:
    monkeypatch.setattr(engine, "read_cpu_flags", lambda: frozenset(AVX2_EPYC))
    monkeypatch.setattr(engine, "_cuda_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="das.vllm.engine"):
        assert resolve_dtype("auto") == "float32"
    assert "dtype float32: the CPU lacks avx512_bf16 and amx_bf16" in caplog.text
