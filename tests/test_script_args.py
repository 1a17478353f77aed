"""The benchmark scripts' shared arguments: a trace's steps and a cost model, or an exit that
names the flag and the value."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from das.bench import script_args
from policies.cost_model import StepCostModel

SMALL_TRACE = Path(__file__).parent / "data" / "trace_small.parquet"


def test_a_trace_is_read_into_its_steps():
    steps = script_args.trace_steps(argparse.ArgumentParser(), SMALL_TRACE, min_steps=3)
    assert sorted(steps) == [0, 1, 2]
    assert [len(records) for records in steps.values()] == [64, 64, 64]


@pytest.mark.parametrize(
    ("path", "min_steps", "message"),
    [
        (Path("no/such/trace.parquet"), 1, "--trace no/such/trace.parquet does not exist, record"),
        (SMALL_TRACE, 4, f"--trace {SMALL_TRACE} has 3 step(s); this needs >= 4"),
    ],
    ids=["missing", "too few steps"],
)
def test_a_missing_or_short_trace_exits_naming_it(capsys, path, min_steps, message):
    with pytest.raises(SystemExit) as exit_info:
        script_args.trace_steps(argparse.ArgumentParser(), path, min_steps, hint=", record")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_cost_model_is_loaded_by_name_or_spec_and_a_bad_one_exits_naming_the_flag(capsys):
    parser = argparse.ArgumentParser()
    assert script_args.cost_model(parser, "0.01,0.001") == StepCostModel(0.01, 0.001)
    with pytest.raises(SystemExit):
        script_args.cost_model(parser, "no_such_model", flag="--gpu-cost")
    assert "--gpu-cost 'no_such_model'" in capsys.readouterr().err
