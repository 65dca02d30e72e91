"""The sender's transfer table: the TTL is absolute from registration, however often a reader pulls (issue 14)."""

from __future__ import annotations

import time

import torch

from mmtransfer import BlockPool
from mmtransfer.observer import TransferObserver
from mmtransfer.sender_table import EXPIRED, LIFETIME_TTLS, TransferTable


def test_pulls_restart_the_ttl_but_never_past_the_absolute_limit():
    pool = BlockPool(8, 4, 2, torch.float32, "cpu", name="t")
    table = TransferTable(pool, ttl_s=0.2, observer=TransferObserver(), name="t")
    table.add("a" * 32, "r1")
    table.publish("a" * 32, pool.alloc(2), aux=None, release=None)
    entry = table.get("a" * 32)
    start = time.monotonic()
    while time.monotonic() - start < LIFETIME_TTLS * 0.2 + 0.3:  # a reader pulling every 50 ms
        if table.get("a" * 32) is not None:
            table.touch(entry)
        table.reap_expired()
        time.sleep(0.05)
    assert table.get("a" * 32) is None and pool.used_blocks == 0  # reclaimed although pulled all along
    assert entry.expires_at <= entry.limit_at <= start + LIFETIME_TTLS * 0.2 + 0.01
    assert table.ending("a" * 32) == EXPIRED


def test_a_pull_within_the_ttl_keeps_the_blocks():
    pool = BlockPool(8, 4, 2, torch.float32, "cpu", name="t")
    table = TransferTable(pool, ttl_s=0.3, observer=TransferObserver(), name="t")
    table.add("b" * 32, "r2")
    table.publish("b" * 32, pool.alloc(2), aux=None, release=None)
    time.sleep(0.2)
    table.touch(table.get("b" * 32))
    time.sleep(0.2)  # 0.4 s after registration: past the first TTL, not past the restarted one
    table.reap_expired()
    assert table.get("b" * 32) is not None and pool.used_blocks == 2
