"""JSON reports are written whole or not at all."""

from __future__ import annotations

import json

import pytest

from das.atomic_json import write_json_atomically


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "results" / "report.json"
    write_json_atomically({"speedup": 1.5}, path)  # creates the folder
    assert json.loads(path.read_text()) == {"speedup": 1.5}
    with pytest.raises(TypeError):
        # json.dump streams: the first key is written before the set fails to serialise.
        write_json_atomically({"speedup": 2.0, "bad": {1, 2}}, path)
    assert json.loads(path.read_text()) == {"speedup": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
