"""CPU seconds an engine's processes used during a step, and what everything else used.

On a small machine a step's wall time depends on what else runs: an engine that got less CPU
looks slower without having done more work. :class:`EngineCpuClock` reads the CPU time of one
vLLM engine's processes (its engine core and workers, found as the child processes its start
created, plus this process, which runs vLLM's output processing) and the machine's total busy
time, so each step can report ``engine_cpu_s`` and ``other_cpu_s`` (busy time of every other
process: idle engines, the OS, a profiler someone attached).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


def child_pids() -> set[int]:
    """Process ids of this process's descendants."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent outside idle and I/O wait since boot (steal excluded)."""
    times = psutil.cpu_times()
    busy = times.user + times.system
    for name in ("nice", "irq", "softirq"):
        busy += getattr(times, name, 0.0)
    return busy


@dataclass(frozen=True)
class CpuReading:
    """One reading of :class:`EngineCpuClock`."""

    engine_s: float
    machine_busy_s: float

    def until(self, later: CpuReading) -> tuple[float, float]:
        """``(engine CPU seconds, other CPU seconds)`` between this reading and ``later``."""
        engine = later.engine_s - self.engine_s
        return engine, max(later.machine_busy_s - self.machine_busy_s - engine, 0.0)


class EngineCpuClock:
    """CPU time of one engine's processes (see the module docstring)."""

    def __init__(self, pids: set[int]) -> None:
        self._processes: list[psutil.Process] = []
        for pid in sorted(pids | {os.getpid()}):
            try:
                self._processes.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue

    @classmethod
    def started_since(cls, before: set[int]) -> EngineCpuClock:
        """The clock of the processes started since ``before`` (a :func:`child_pids` set)."""
        return cls(child_pids() - before)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def read(self) -> CpuReading:
        """The engine's CPU seconds so far (processes that exited count no more)."""
        engine = 0.0
        for process in self._processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            engine += times.user + times.system
        return CpuReading(engine_s=engine, machine_busy_s=machine_busy_seconds())
