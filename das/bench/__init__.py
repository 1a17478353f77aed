"""Measuring DAS: the live rollout benchmark and its report, per-step time breakdowns, the
machine-speed probe, CPU accounting of engine processes, engine-step cost tables and the
offline replay report.
"""
