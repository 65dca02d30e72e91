from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtransfer import TransferConfig
from mmtransfer.window import AdaptiveWindow, WindowPolicy, make_window_policy


def test_fixed_window_and_hint():
    policy = WindowPolicy(TransferConfig())
    assert policy.window_blocks() == 8
    assert policy.window_blocks(hint_tokens=200) == 2
    assert policy.window_blocks(hint_tokens=5000) == 8
    assert WindowPolicy(TransferConfig(use_size_hint=False)).window_blocks(200) == 8


def test_adaptive_uses_default_until_enough_samples_then_percentile():
    cfg = TransferConfig(window_policy="adaptive", adaptive_min_samples=4, adaptive_percentile=75, use_size_hint=False)
    policy = make_window_policy(cfg)
    assert isinstance(policy, AdaptiveWindow)
    for n in (1500, 1600, 1700):
        policy.observe(n)
    assert policy.window_tokens() == 1024
    policy.observe(3000)
    assert policy.window_tokens() == 1700  # 75th percentile of 4 samples
    assert policy.window_blocks() == 14


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100_000), min_size=1, max_size=200), st.floats(1, 100))
def test_adaptive_window_is_bounded(lengths, pct):
    cfg = TransferConfig(
        window_policy="adaptive",
        adaptive_min_samples=1,
        adaptive_percentile=pct,
        adaptive_max_window_tokens=4096,
        use_size_hint=False,
    )
    policy = AdaptiveWindow(cfg)
    for n in lengths:
        policy.observe(n)
    assert cfg.block_tokens <= policy.window_tokens() <= 4096
    assert policy.window_tokens() in {min(max(n, 128), 4096) for n in lengths}


def test_bad_policy_rejected():
    with pytest.raises(ValueError, match="window_policy"):
        TransferConfig(window_policy="magic")
