"""The test-only draft faults that the real-engine robustness tests install (no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from das.vllm.faults import DraftFault, InjectedFault

VOCAB = 100


def drafts() -> np.ndarray:
    return np.array([[11, 12, 13, 14], [21, 22, 23, 24]], np.int32)


def test_shifted_drafts_are_the_right_ones_one_position_late() -> None:
    tokens = drafts()
    DraftFault("shifted").corrupt(tokens, np.array([10, 20], np.int32), VOCAB)
    assert tokens.tolist() == [[10, 11, 12, 13], [20, 21, 22, 23]]


def test_random_drafts_stay_in_the_vocabulary_and_change() -> None:
    tokens = np.repeat(drafts(), 50, axis=0)
    DraftFault("random", seed=3).corrupt(tokens, np.zeros(len(tokens), np.int32), VOCAB)
    assert tokens.min() >= 0 and tokens.max() < VOCAB
    assert (tokens != np.repeat(drafts(), 50, axis=0)).mean() > 0.9


def test_out_of_vocab_fault_puts_a_bad_id_second() -> None:
    tokens = drafts()
    DraftFault("out_of_vocab").corrupt(tokens, np.zeros(2, np.int32), VOCAB)
    assert (tokens[:, 0] == drafts()[:, 0]).all() and (tokens[:, 1] >= VOCAB).all()


def test_raise_fault_throws_on_every_nth_call_only() -> None:
    fault = DraftFault("raise", every=3)
    raised = []
    for call in range(1, 10):
        try:
            fault.before_propose()
        except InjectedFault:
            raised.append(call)
    assert raised == [3, 6, 9] and fault.num_raised == 3


@pytest.mark.parametrize(
    ("mode", "every", "message"), [("bogus", 1, "mode='bogus'"), ("raise", 0, "every=0")]
)
def test_bad_fault_settings_name_the_value(mode: str, every: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DraftFault(mode, every=every)
