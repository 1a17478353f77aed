"""Measuring DAS: the live rollout benchmark and its report, per-step time breakdowns, the
machine-speed probe, CPU accounting of engine processes, engine-step cost tables, the
offline replay report, the replay oracles that know a trace's responses, and the arguments
the trace benchmarks in ``scripts/`` share.
"""
