"""The receiver's connections (issue 14): one reused per sender endpoint, a bound on how many are open
(least recently used idle ones closed first), and a clear refusal when every one is in use."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch

from mmtransfer import BlockPool, FailureCause, Receiver, SenderEndpoint, SocketsExhausted, TransferConfig

HIDDEN = 16


@pytest.fixture
def cfg():
    return TransferConfig(
        block_tokens=8, default_window_tokens=32, max_embed_tokens=512, pool_blocks=16, pull_timeout_s=2.0
    )


def _senders(cfg, n):
    return [
        SenderEndpoint(BlockPool(64, cfg.block_tokens, HIDDEN, torch.float32, name=f"tx{i}"), cfg) for i in range(n)
    ]


def _local_ports_to(port: int) -> set[int]:
    """Local ports of every TCP connection (any state, TIME_WAIT included) to 127.0.0.1:``port``."""
    ports = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote = line.split()[1:3]
            if remote == f"0100007F:{port:04X}":
                ports.add(int(local.split(":")[1], 16))
    return ports


def _fds() -> int:
    gc.collect()  # every CPU pool holds a memfd until it is collected: earlier tests' pools must not count
    return len(os.listdir("/proc/self/fd"))


def test_pulls_from_one_endpoint_share_one_connection(cfg):
    (sender,) = _senders(cfg, 1)
    rpool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, torch.float32, name="rx")
    try:
        with Receiver(rpool, cfg) as receiver:
            data = torch.randn(70, HIDDEN)  # three chunks: continuations on the same connection
            assert torch.equal(receiver.pull(sender.register(data)).embedding, data)
            fds = _fds()
            for _ in range(20):
                assert torch.equal(receiver.pull(sender.register(data)).embedding, data)
                receiver.abort(sender.register(data), "not needed")  # an ABORT goes on the same one
            assert _local_ports_to(sender.port) and len(_local_ports_to(sender.port)) == 1
            assert receiver.sockets.open_sockets == 1 and _fds() == fds
    finally:
        sender.close()
    assert rpool.used_blocks == 0


def test_concurrent_pulls_each_hold_one_and_keep_them_for_later(cfg):
    (sender,) = _senders(cfg, 1)
    rpool = BlockPool(64, cfg.block_tokens, HIDDEN, torch.float32, name="rx")
    try:
        with Receiver(rpool, cfg) as receiver:
            datas = [torch.randn(50, HIDDEN) for _ in range(6)]
            for _ in range(3):
                refs = [sender.register(d) for d in datas]
                got: dict[int, torch.Tensor] = {}

                def work(i: int, refs=refs, got=got) -> None:
                    got[i] = receiver.pull(refs[i]).embedding

                threads = [threading.Thread(target=work, args=(i,)) for i in range(len(refs))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                assert all(torch.equal(got[i], d) for i, d in enumerate(datas))
            # never more connections than pulls at once, reused by the rounds after the first
            assert receiver.sockets.open_sockets <= len(datas)
            assert len(_local_ports_to(sender.port)) <= len(datas)
    finally:
        sender.close()


def test_the_bound_closes_the_least_recently_used_endpoint(cfg):
    senders = _senders(cfg, 5)
    rpool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, torch.float32, name="rx")
    try:
        with Receiver(rpool, cfg.replace(max_sockets=3)) as receiver:
            data = torch.randn(20, HIDDEN)
            fds = None
            for sender in senders + senders[-2:]:
                assert torch.equal(receiver.pull(sender.register(data)).embedding, data)
                assert receiver.sockets.open_sockets <= 3
                if sender is senders[2]:
                    fds = _fds()
            assert _fds() <= fds  # five endpoints, three connections
            open_to = {s.address for s in senders if receiver.sockets.idle.get(s.address)}
            assert open_to == {senders[2].address, senders[3].address, senders[4].address}
    finally:
        for sender in senders:
            sender.close()


def test_a_pull_needing_one_more_than_the_bound_is_refused_clearly(cfg):
    senders = _senders(cfg, 2)
    rpool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, torch.float32, name="rx")
    try:
        with Receiver(rpool, cfg.replace(max_sockets=2)) as receiver:
            held = [receiver.sockets.take(senders[0].address) for _ in range(2)]  # two pulls in progress
            data = torch.randn(20, HIDDEN)
            ref = senders[1].register(data)
            start = time.monotonic()
            with pytest.raises(SocketsExhausted, match="all 2 connections") as info:
                receiver.pull(ref)
            assert time.monotonic() - start < 1 and info.value.cause is FailureCause.SOCKETS
            assert rpool.used_blocks == 0 and receiver.sockets.open_sockets == 2
            receiver.abort(senders[1].register(data), "best effort")  # no connection for it: left to the TTL
            assert receiver.sockets.open_sockets == 2
            for sock in held:
                receiver.sockets.give(senders[0].address, sock)
            # once one is idle again, it is closed to make room; the embedding is still there
            assert torch.equal(receiver.pull(ref).embedding, data)
            assert receiver.sockets.open_sockets == 2
    finally:
        for sender in senders:
            sender.close()
