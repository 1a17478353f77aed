"""The per-step CPU clock of an engine's processes (real child processes that burn CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from das.bench.engine_cpu import EngineCpuClock, child_pids

# A process that burns a fixed amount of CPU time once told to, then idles: its CPU seconds
# are known whatever else loads the machine (a wall-clock burn gets less CPU under load).
BURN = """import sys, time
print("ready", flush=True)
sys.stdin.readline()
end = time.process_time() + {seconds}
while time.process_time() < end:
    pass
print("done", flush=True)
sys.stdin.readline()
"""


def _burner(seconds: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", BURN.format(seconds=seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n"  # its start-up CPU is spent
    return process


def _burn(*processes: subprocess.Popen) -> None:
    """Tell ``processes`` to burn, and wait until each has burnt its CPU seconds."""
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        assert process.stdout.readline() == "done\n"


def _stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.kill()
        process.wait()


def test_clock_counts_the_engines_processes_and_others_apart() -> None:
    other = _burner(1.0)  # started before the "engine": someone else's load
    before = child_pids()
    engine = _burner(1.0)
    try:
        clock = EngineCpuClock.started_since(before)
        assert engine.pid in clock.pids and other.pid not in clock.pids
        start = clock.read()
        _burn(engine, other)
        engine_s, other_s = start.until(clock.read())
        assert engine_s == pytest.approx(1.0, abs=0.2)  # the engine's second, not the other's
        assert other_s >= 0.8  # the other's second, and whatever else ran
    finally:
        _stop(engine, other)


def test_clock_reads_a_live_engine_process() -> None:
    before = child_pids()
    engine = _burner(1.0)
    try:
        clock = EngineCpuClock.started_since(before)
        start = clock.read()
        _burn(engine)
        engine_s, _ = start.until(clock.read())
        assert engine_s == pytest.approx(1.0, abs=0.2)  # one CPU second, however long it took
    finally:
        _stop(engine)
