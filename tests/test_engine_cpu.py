"""The per-step CPU clock of an engine's processes (real child processes that burn CPU)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from das.bench.engine_cpu import EngineCpuClock, child_pids

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def _burner(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)])


def test_clock_counts_the_engines_processes_and_others_apart() -> None:
    other = _burner(3.0)  # started before the "engine": someone else's load
    before = child_pids()
    engine = _burner(3.0)
    try:
        clock = EngineCpuClock.started_since(before)
        assert engine.pid in clock.pids and other.pid not in clock.pids
        start = clock.read()
        time.sleep(1.0)
        engine_s, other_s = start.until(clock.read())
        # two busy processes for one second on >= 1 core: each got a share
        assert 0.2 < engine_s < 1.5
        assert other_s > 0.2
    finally:
        for process in (engine, other):
            process.kill()
            process.wait()


def test_clock_reads_a_live_engine_process() -> None:
    before = child_pids()
    engine = _burner(1.5)
    try:
        clock = EngineCpuClock.started_since(before)
        start = clock.read()
        time.sleep(1.0)
        engine_s, _ = start.until(clock.read())
        assert engine_s == pytest.approx(1.0, abs=0.5)  # one busy process for one second
    finally:
        engine.kill()
        engine.wait()
