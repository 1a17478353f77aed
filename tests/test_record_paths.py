"""A recorded trace's metadata names no machine's home folder."""

from __future__ import annotations

from pathlib import Path

from das.vllm.record import home_relative


def test_paths_under_home_are_written_with_a_tilde():
    home = str(Path.home())
    assert home_relative(f"{home}/.cache/das/models/m") == "~/.cache/das/models/m"
    assert home_relative(home) == "~"


def test_other_paths_and_names_stay_as_they_are():
    home = str(Path.home())
    assert home_relative(home + "x/models/m") == home + "x/models/m"  # a sibling, not inside
    assert home_relative("/opt/models/m") == "/opt/models/m"
    assert home_relative("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
