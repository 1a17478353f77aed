"""The live benchmark's bookkeeping: engine arguments per method, summaries, identity, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from das.bench.live import (
    COMPARED_METHODS,
    EngineCounters,
    LiveWorkload,
    MethodRun,
    StepMeasurement,
    engine_kwargs_for,
    identity_report,
    summarize,
)
from das.bench.live_report import build_report, format_table, plot_live

ROOT = Path(__file__).resolve().parent.parent


def step(index: int, wall_s: float, iterations: int, drafts: int = 0, accepted: int = 0):
    return StepMeasurement(
        step=index,
        wall_s=wall_s,
        decode_iterations=iterations,
        output_tokens=100,
        num_requests=4,
        num_drafts=drafts,
        draft_tokens=4 * drafts,
        accepted_tokens=accepted,
        mean_response_len=25.0,
        share_truncated=0.25,
    )


def make_runs() -> dict[str, MethodRun]:
    none = MethodRun("none", {}, steps=[step(i, 2.0, 100) for i in range(3)])
    none.probe_tokens = [[1, 2, 3], [4, 5]]
    das = MethodRun("das_policy", engine_kwargs_for("das_policy", 8))
    das.steps = [step(0, 2.2, 100), step(1, 1.0, 50, 40, 60), step(2, 1.5, 70, 30, 30)]
    das.probe_tokens = [[1, 2, 3], [4, 6]]
    return {"none": none, "das_policy": das}


def test_engine_kwargs_differ_only_in_speculation() -> None:
    assert engine_kwargs_for("none", 8) == {}
    assert engine_kwargs_for("ngram", 8)["speculative_config"]["method"] == "ngram"
    assert engine_kwargs_for("suffix", 8)["speculative_config"] == {
        "method": "suffix",
        "num_speculative_tokens": 8,
    }
    fixed = engine_kwargs_for("das_fixed", 8)
    policy = engine_kwargs_for("das_policy", 8)
    assert fixed["speculative_config"]["method"] == "custom_class"
    assert fixed["additional_config"]["das"]["policy"] == "fixed"
    assert policy["additional_config"]["das"]["policy"] == "cost_model"
    assert policy["speculative_config"]["num_speculative_tokens"] == 8
    capped = engine_kwargs_for("das_policy", 8, {"max_draft_batch": 16, "policy": "fixed"})
    assert capped["additional_config"]["das"]["max_draft_batch"] == 16
    assert capped["additional_config"]["das"]["policy"] == "cost_model"  # the method's policy
    idle = engine_kwargs_for("spec_idle", 8)["speculative_config"]
    assert idle["method"] == "ngram" and idle["prompt_lookup_min"] == 64
    with pytest.raises(ValueError, match="method='eagle'"):
        engine_kwargs_for("eagle", 8)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_prompts", 0), ("num_steps", -1), ("max_tokens", 1.5), ("probe_tokens", -1)],
)
def test_workload_rejects_bad_values_naming_them(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        LiveWorkload(**{field: value})


def test_counters_difference() -> None:
    before = EngineCounters(iterations=3, generation_tokens=10, num_drafts=1)
    after = EngineCounters(iterations=8, generation_tokens=30, num_drafts=4, num_accepted_tokens=5)
    delta = after.minus(before)
    assert (delta.iterations, delta.generation_tokens, delta.num_drafts) == (5, 20, 3)
    assert delta.num_accepted_tokens == 5


def test_mean_accepted_len_is_vllms_definition() -> None:
    assert step(0, 1.0, 10).mean_accepted_len == 1.0
    assert step(0, 1.0, 10, drafts=40, accepted=60).mean_accepted_len == pytest.approx(2.5)


def test_identity_report_finds_first_divergence() -> None:
    report = identity_report([[1, 2, 3], [4, 5], [7]], [[1, 2, 3], [4, 6], [7, 8]])
    assert report["identical"] is False
    assert report["num_identical"] == 1
    assert report["first_divergence"] == [None, 1, 1]
    assert identity_report([[1, 2]], [[1, 2]])["identical"] is True
    assert identity_report([], [[1]])["identical"] is None


def test_summary_compares_steps_two_on_against_none() -> None:
    summary = summarize(make_runs(), [1, 2])
    das = summary["das_policy"]
    assert das["wall_s"] == pytest.approx(2.5)
    assert das["speedup_vs_none"] == pytest.approx(4.0 / 2.5)
    assert das["iterations_vs_none"] == pytest.approx(120 / 200)
    assert das["per_step_wall_vs_none"] == pytest.approx([1.1, 0.5, 0.75])
    assert das["identity"]["identical"] is False
    incomplete = make_runs()
    incomplete["das_policy"].steps = incomplete["das_policy"].steps[:2]
    assert summarize(incomplete, [1, 2])["das_policy"] == {"complete": False}


def test_report_has_the_issue_schema(tmp_path: Path) -> None:
    runs = make_runs()
    runs["none_repeat"] = MethodRun("none_repeat", {}, steps=[step(i, 2.1, 100) for i in range(3)])
    workload = LiveWorkload(num_prompts=2, num_samples=2, num_steps=3)
    report = json.loads(json.dumps(build_report(runs, workload, "das-rollout run")))
    assert report["command"] == "das-rollout run"
    assert report["greedy_identical"] is False
    assert set(report["methods"]) == {"none", "das_policy"}
    assert set(report["diagnostics"]) == {"none_repeat"}
    assert report["summary"]["none_repeat"]["speedup_vs_none"] == pytest.approx(2.0 / 2.1)
    for name, method in report["methods"].items():
        assert name in COMPARED_METHODS
        for entry in method["steps"]:
            for key, kind in (
                ("step", int),
                ("wall_s", float),
                ("decode_iterations", int),
                ("output_tokens", int),
                ("mean_accepted_len", float),
            ):
                assert isinstance(entry[key], kind), (name, key)
    table = format_table(runs, workload)
    assert "das_policy" in table and "greedy probe identical 1/2" in table
    png = plot_live(runs, tmp_path / "live.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_script_presets_and_overrides(load_script) -> None:
    module = load_script("bench_rollout")
    argv = module.build_argv(["--workload", "small", "--temperature", "1.0", "--json", "x.json"])
    assert argv[0] == "run"
    assert argv[argv.index("--num-prompts") + 1] == "4"
    # the user's options come last, so they override the preset's
    assert argv[len(argv) - 1 - argv[::-1].index("--temperature") + 1] == "1.0"
    assert argv.count("--json") == 1 and argv[argv.index("--plot") + 1] == "x.png"
    assert module.build_argv([])[module.build_argv([]).index("--num-prompts") + 1] == "32"


class FakeSession:
    """Stands in for an engine (MethodSession) in the interleaving test; records every call."""

    calls: ClassVar[list[tuple[str, object]]] = []

    def __init__(self, method: str, workload: LiveWorkload, prompts) -> None:
        self.run = MethodRun(method, {})
        self.calls.append((method, "start"))

    def step(self, index: int, progress: bool = True) -> None:
        self.calls.append((self.run.method, index))
        self.run.steps.append(step(index, 1.0, 10))

    def finish(self) -> None:
        self.calls.append((self.run.method, "finish"))

    def close(self) -> None:
        self.calls.append((self.run.method, "close"))


def test_interleave_runs_each_step_on_every_engine_with_fake_sessions(monkeypatch) -> None:
    from das.bench import live as live_bench
    from rollouts.prompts import Prompt

    FakeSession.calls = []
    monkeypatch.setattr(live_bench, "MethodSession", FakeSession)
    updates = []
    runs = live_bench.run_comparison(
        ["das_policy", "none"],
        LiveWorkload(num_steps=3),
        [Prompt(0, "q", None)],
        on_method_done=lambda runs: updates.append(sum(len(r.steps) for r in runs.values())),
        interleave=True,
    )
    order = [call for call in FakeSession.calls if isinstance(call[1], int)]
    # none first, the order reversed on odd steps; step s everywhere before step s + 1.
    assert order == [
        ("none", 0),
        ("das_policy", 0),
        ("das_policy", 1),
        ("none", 1),
        ("none", 2),
        ("das_policy", 2),
    ]
    assert FakeSession.calls[:2] == [("none", "start"), ("das_policy", "start")]
    assert FakeSession.calls[-2:] == [("none", "close"), ("das_policy", "close")]
    assert [len(run.steps) for run in runs.values()] == [3, 3]
    assert updates == [1, 2, 3, 4, 5, 6, 6]  # saved after every step and at the end


def test_engine_counter_logger_counts_what_vllms_prometheus_logger_does() -> None:
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from das.bench.live import EngineCounterLogger

    counter = EngineCounterLogger()
    spec = SpecDecodingStats.new(num_spec_tokens=4)
    spec.observe_draft(num_draft_tokens=4, num_accepted_tokens=3)
    iteration = IterationStats()
    iteration.num_generation_tokens = 7
    counter.record(SchedulerStats(spec_decoding_stats=spec), iteration)
    counter.record(SchedulerStats(), None)  # a record without an iteration is not one
    before = counter.snapshot()
    counter.record(None, iteration)
    assert before == EngineCounters(1, 7, 1, 4, 3)
    assert counter.snapshot().minus(before) == EngineCounters(1, 7, 0, 0, 0)


def test_summary_compares_each_steps_rollouts_with_none_by_digest() -> None:
    runs = make_runs()
    for run in runs.values():
        for measured in run.steps:
            measured.output_digest = f"rollouts-{measured.step}"
    runs["das_policy"].steps[2].output_digest = "other"
    summary = summarize(runs, [1, 2])
    assert summary["das_policy"]["rollouts_identical_to_none"] == [True, True, False]
    runs["das_policy"].steps[0].output_digest = ""  # not measured: never counts as identical
    assert summarize(runs, [1, 2])["das_policy"]["rollouts_identical_to_none"][0] is False


def test_keyed_sampling_params_seed_each_rollout_by_prompt_sample_and_step() -> None:
    from das.bench.live import _sampling_params, rollout_seed
    from das.vllm.keyed import OPTION
    from rollouts.prompts import Prompt

    seeds = {rollout_seed(0, p, s, t) for p in range(32) for s in range(8) for t in range(4)}
    assert len(seeds) == 32 * 8 * 4
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert rollout_seed(0, 1, 2, 3) == rollout_seed(0, 1, 2, 3) != rollout_seed(1, 1, 2, 3)
    keyed = _sampling_params(0.6, 1.0, 16, Prompt(5, "q", None), 2, keyed_seed=7)
    assert keyed.seed == 7 and keyed.extra_args[OPTION] is True
    plain = _sampling_params(0.6, 1.0, 16, Prompt(5, "q", None), 2)
    assert plain.seed is None and OPTION not in plain.extra_args
    assert plain.extra_args["das_prompt_key"] == "prompt:5"


def test_das_options_are_parsed_as_json_and_checked_before_any_engine_starts() -> None:
    from das.bench.live import LiveWorkload
    from das.cli.args import parse_das_options

    options = parse_das_options(["max_draft_batch=16", "calibrate=false", "policy=fixed"])
    assert options == (("max_draft_batch", 16), ("calibrate", False), ("policy", "fixed"))
    assert LiveWorkload(das_options=options).das_options == options
    with pytest.raises(ValueError, match="must be KEY=VALUE"):
        parse_das_options(["max_draft_batch"])
    with pytest.raises(ValueError, match="bogus"):
        LiveWorkload(das_options=(("bogus", 1),))
    with pytest.raises(ValueError, match="max_draft_batch=-1"):
        LiveWorkload(das_options=(("max_draft_batch", -1),))


def test_sigterm_unwinds_so_engines_are_shut_down(tmp_path) -> None:
    import subprocess
    import sys
    import time

    marker = tmp_path / "finally-ran"
    script = (
        "import time\n"
        "from das.cli.run import unwind_on_sigterm\n"
        "unwind_on_sigterm()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').write('closed')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    process.terminate()
    assert process.wait(timeout=30) == 128 + 15
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "closed"


def test_ratios_at_equal_machine_speed_divide_out_the_probe() -> None:
    from das.bench.live import probe_adjusted_ratio
    from das.bench.live_report import format_table

    none = MethodRun("none", {}, steps=[step(i, 2.0, 100) for i in range(2)])
    das = MethodRun("das_policy", {}, steps=[step(i, 3.0, 100) for i in range(2)])
    # The machine ran none's steps at probe 0.5 s and DAS's at 0.75 s: 1.5x slower, which is
    # all of DAS's 1.5x longer wall time in step 1. Step 2 has no probe.
    none.steps[0].probe_before_s, none.steps[0].probe_after_s = 0.4, 0.6
    das.steps[0].probe_before_s, das.steps[0].probe_after_s = 0.7, 0.8
    assert das.steps[0].machine_probe_s == pytest.approx(0.75)
    assert probe_adjusted_ratio(das.steps[0], none.steps[0]) == pytest.approx(1.0)
    assert probe_adjusted_ratio(das.steps[1], none.steps[1]) is None
    summary = summarize({"none": none, "das_policy": das}, [0, 1])
    ratios = summary["das_policy"]["per_step_wall_vs_none_at_equal_machine_speed"]
    assert ratios[0] == pytest.approx(1.0) and ratios[1] is None
    workload = LiveWorkload(num_prompts=1, num_samples=1, num_steps=2)
    table = format_table({"none": none, "das_policy": das}, workload)
    assert "at equal machine speed" in table and "1.00    -" in table


def test_machine_probe_times_real_work() -> None:
    from das.bench.machine_probe import probe_seconds

    seconds = probe_seconds(repeats=1, matmuls=1, copies=1)
    assert 0.0 < seconds < 60.0
