# DAS developer entry points. `make setup` builds .venv/ from the project's own files.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.das-setup-stamp
export VLLM_TARGET_DEVICE ?= cpu
# Prompts of the gsm8k source (demo, record, run, bench): a GSM8K train.jsonl named by
# DAS_GSM8K_PATH. Unset, DAS loads the hub's openai/gsm8k, or built-in problems when offline.
# Here it defaults to ../shared/data/gsm8k/train.jsonl when that file exists beside the
# repository; override with `make demo DAS_GSM8K_PATH=/path/to/train.jsonl`.
DAS_GSM8K_PATH ?= $(wildcard $(abspath ../shared/data/gsm8k/train.jsonl))
export DAS_GSM8K_PATH

.PHONY: setup test test-fast test-slow test-nojit lint demo bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh scripts/vllm_cpu_alias/pyproject.toml
	bash scripts/setup_env.sh

setup: $(STAMP)

# The whole suite as CI runs it: lint, fast tier, tree tests without JIT, slow end-to-end tier.
test: setup lint test-fast test-nojit test-slow

test-fast: setup
	$(PY) -m pytest -m "not slow" -q

# The tree against its oracle with numba's JIT off: the kernels as plain Python.
test-nojit: setup
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest -q tests/test_suffix_tree.py tests/test_suffix_forest.py \
		tests/test_suffix_matches_along.py tests/test_suffix_known_continuation.py

test-slow: setup
	$(PY) -m pytest -m slow -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Records a small trace with the embedded model (dtype by CPU: see `das-rollout demo --help`),
# replays every drafting method on it and explains the result.
demo: setup
	$(VENV)/bin/das-rollout demo

bench: setup
	$(PY) scripts/bench_suffix_tree.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
