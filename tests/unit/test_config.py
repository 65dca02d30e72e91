from __future__ import annotations

import pytest

from mmtransfer import ConfigError, TransferConfig


def test_defaults_match_the_design():
    cfg = TransferConfig()
    assert (cfg.use_block_allocator, cfg.block_tokens, cfg.default_window_tokens, cfg.pool_blocks) == (
        True,
        128,
        1024,
        64,
    )
    assert cfg.window_blocks == 8
    assert cfg.control_host == "127.0.0.1"


def test_parameters_then_env_overrides():
    params = {"block_tokens": "64", "pool_blocks": "32", "use_block_allocator": "false", "unrelated": "x"}
    env = {"MM_POOL_BLOCKS": "128", "MM_TTL_S": "5.5"}
    cfg = TransferConfig.from_mapping(params, env)
    assert cfg.block_tokens == 64
    assert cfg.pool_blocks == 128  # env wins
    assert cfg.use_block_allocator is False
    assert cfg.ttl_s == 5.5


@pytest.mark.parametrize(
    "params, message",
    [
        ({"block_tokens": "0"}, "block_tokens must be an integer"),
        ({"block_tokens": "abc"}, "cannot parse 'abc'"),
        ({"use_block_allocator": "maybe"}, "use_block_allocator"),
        ({"ttl_s": "-1"}, "ttl_s must be in"),
        ({"control_port": "70000"}, "control_port"),
    ],
)
def test_bad_values_have_clear_messages(params, message):
    with pytest.raises(ConfigError, match=message):
        TransferConfig.from_mapping(params, {})


def test_window_rounds_up_to_whole_blocks():
    assert TransferConfig(block_tokens=100, default_window_tokens=1024).window_blocks == 11
