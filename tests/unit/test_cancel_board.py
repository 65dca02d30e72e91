"""mm_triton.cancel_board: the keys a pipeline posts when its client gives up during generation."""

from __future__ import annotations

import numpy as np
import pytest

from mm_triton.cancel_board import (
    CANCEL_KEY_INPUT,
    CancelBoard,
    check_cancel_key,
    either,
    new_cancel_key,
    read_cancel_key,
)


@pytest.fixture
def board(tmp_path):
    return CancelBoard.of_this_server(base=tmp_path)


def test_a_posted_key_is_seen_by_a_probe_until_cleared(board):
    key, other = new_cancel_key(), new_cancel_key()
    probe, other_probe = board.probe(key, min_interval_s=0), board.probe(other, min_interval_s=0)
    assert not probe() and not board.posted(key)
    board.post(key)
    assert probe() and board.posted(key) and not other_probe()
    board.clear(key)
    board.clear(key)  # twice is fine
    assert not board.posted(key)
    assert probe()  # once cancelled, the sequence stays cancelled


def test_the_board_is_private_and_per_server(tmp_path, board):
    assert board.directory.parent.stat().st_mode & 0o077 == 0
    board.post(k := new_cancel_key())
    assert (board.directory / k).stat().st_mode & 0o077 == 0
    assert board.directory.name.startswith("cancel-")


def test_a_probe_stats_at_most_once_per_interval(board):
    key = new_cancel_key()
    probe = board.probe(key, min_interval_s=3600)
    assert not probe()
    board.post(key)
    assert not probe()  # the answer is reused inside the interval: one stat per decode step at most


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "A" * 32, "0" * 31, "0" * 33, "0" * 31 + "/"])
def test_keys_that_are_not_ours_are_refused_before_any_path_is_built(board, bad):
    with pytest.raises(ValueError, match=CANCEL_KEY_INPUT):
        check_cancel_key(bad)
    with pytest.raises(ValueError):
        board.post(bad)


class _Tensor:
    def __init__(self, values):
        self._values = np.array(values, dtype=np.object_)

    def as_numpy(self):
        return self._values


class _Pb:
    def __init__(self, inputs):
        self.inputs = inputs

    def get_input_tensor_by_name(self, request, name):
        return self.inputs.get(name)


def test_read_cancel_key_checks_the_input():
    key = new_cancel_key()
    assert read_cancel_key(_Pb({}), None) is None
    assert read_cancel_key(_Pb({CANCEL_KEY_INPUT: _Tensor([key.encode()])}), None) == key
    with pytest.raises(ValueError, match="one value"):
        read_cancel_key(_Pb({CANCEL_KEY_INPUT: _Tensor([key.encode(), key.encode()])}), None)
    with pytest.raises(ValueError, match="not a cancellation key"):
        read_cancel_key(_Pb({CANCEL_KEY_INPUT: _Tensor([b"x"])}), None)


def test_either_is_true_when_any_probe_is():
    a, b = [False], [False]
    probe = either(lambda: a[0], None, lambda: b[0])
    assert not probe()
    b[0] = True
    assert probe()
    only = either(lambda: a[0], None)
    assert not only()
    a[0] = True
    assert only()
