# DAS developer entry points. `make setup` builds .venv/ from the project's own files.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.das-setup-stamp
export VLLM_TARGET_DEVICE ?= cpu

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
	NUMBA_DISABLE_JIT=1 $(PY) -m pytest -q tests/test_suffix_tree.py tests/test_suffix_forest.py

test-slow: setup
	$(PY) -m pytest -m slow -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: setup
	$(VENV)/bin/das-rollout demo

bench: setup
	$(PY) scripts/bench_suffix_tree.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
