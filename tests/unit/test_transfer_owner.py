"""A transfer serves one receiver at a time, and the bytes a sender queues to one receiver connection
that it has not confirmed read are bounded (issue 14): raw DEALERs play the careless or hostile peers."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from mm_triton.procfs import rss_kib
from mmtransfer import (
    BlockPool,
    EmbedRef,
    ErrorCode,
    FailureCause,
    Receiver,
    SenderEndpoint,
    TransferConfig,
    TransferInUse,
    wire,
)

from ._sender_proc import SenderProcess

HIDDEN = 16


@pytest.fixture
def cfg():
    return TransferConfig(
        block_tokens=8, default_window_tokens=32, max_embed_tokens=512, pool_blocks=8, pull_timeout_s=2.0, ttl_s=5.0
    )


@pytest.fixture
def sender(cfg):
    spool = BlockPool(256, cfg.block_tokens, HIDDEN, torch.float32, name="tx")
    endpoint = SenderEndpoint(spool, cfg)
    yield endpoint
    deadline = time.monotonic() + 2
    while spool.used_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spool.used_blocks == 0, "leaked blocks"
    endpoint.close()


class Peer:
    """A raw DEALER: one receiver connection (one ZeroMQ identity)."""

    def __init__(self, address: str, rcvhwm: int = 1000) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.connect(address)

    def send(self, msg: wire.Message) -> None:
        self.sock.send(wire.encode(msg))

    def pull(self, tid: str, seq: int, sent: int, cap: int = 32) -> None:
        self.send(wire.Pull(tid, seq, sent, cap))

    def reply(self, timeout_ms: int = 2000) -> tuple[wire.Message, list[bytes]]:
        assert self.sock.poll(timeout_ms), "no answer"
        frames = self.sock.recv_multipart()
        return wire.decode(frames[0]), frames[1:]

    def silent(self, timeout_ms: int = 200) -> bool:
        return not self.sock.poll(timeout_ms)

    def close(self) -> None:
        self.sock.close(linger=0)


def _error(peer: Peer) -> wire.Error:
    msg, payload = peer.reply()
    assert isinstance(msg, wire.Error) and not payload, msg
    return msg


def test_a_second_receiver_is_refused_while_the_first_pulls(sender):
    data = torch.randn(100, HIDDEN)
    ref = sender.register(data)
    first, second = Peer(sender.address), Peer(sender.address)
    try:
        first.pull(ref.transfer_id, 0, 0)
        chunk, payload = first.reply()
        assert isinstance(chunk, wire.Chunk) and chunk.num_tokens == 32 and len(payload) == 1
        # the second receiver gets ERROR(in_use) and nothing else: no chunk, no bytes
        for verb in (wire.Pull(ref.transfer_id, 0, 0, 32), wire.Pull(ref.transfer_id, 0, 32, 32)):
            second.send(verb)
            refused = _error(second)
            assert refused.code is ErrorCode.IN_USE and "another receiver" in refused.message
        assert second.silent()
        # nor may it end the transfer under the first one: its DONE is refused, its ABORT ignored
        second.send(wire.Done(ref.transfer_id, 1))
        assert _error(second).code is ErrorCode.IN_USE
        second.send(wire.Abort(ref.transfer_id, "not mine"))
        assert second.silent() and sender.state(ref.transfer_id) is not None
        # the first one pulls on to the end and finishes
        got = [torch.frombuffer(bytearray(payload[0]), dtype=torch.float32).view(-1, HIDDEN)]
        for seq, sent in ((1, 32), (2, 64), (3, 96)):
            first.pull(ref.transfer_id, seq, sent)
            chunk, payload = first.reply()
            assert isinstance(chunk, wire.Chunk) and chunk.offset == sent
            got.append(torch.frombuffer(bytearray(payload[0]), dtype=torch.float32).view(-1, HIDDEN))
        assert torch.equal(torch.cat(got), data)
        first.send(wire.Done(ref.transfer_id, 4))
        assert isinstance(first.reply()[0], wire.Ack)
        assert sender.table.unread == {}
    finally:
        first.close()
        second.close()


def test_the_receiver_raises_transfer_in_use_and_the_pull_in_progress_survives(sender, cfg):
    data = torch.randn(40, HIDDEN)
    ref = sender.register(data)
    owner = Peer(sender.address)
    rpool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, torch.float32, name="rx")
    try:
        owner.pull(ref.transfer_id, 0, 0)
        assert isinstance(owner.reply()[0], wire.Chunk)
        with Receiver(rpool, cfg) as receiver:
            with pytest.raises(TransferInUse, match="another receiver") as info:
                receiver.pull(ref, "r-second")
            assert info.value.cause is FailureCause.IN_USE
        assert rpool.used_blocks == 0
        # the refused receiver's ABORT (sent by its failure path) did not end the owner's transfer
        owner.pull(ref.transfer_id, 1, 32)
        chunk, _ = owner.reply()
        assert isinstance(chunk, wire.Chunk) and chunk.offset == 32
        owner.send(wire.Done(ref.transfer_id, 2))
        assert isinstance(owner.reply()[0], wire.Ack)
    finally:
        owner.close()


def test_the_owner_gets_each_chunk_once(sender):
    ref = sender.register(torch.randn(64, HIDDEN))
    peer = Peer(sender.address)
    try:
        peer.pull(ref.transfer_id, 0, 0)
        assert isinstance(peer.reply()[0], wire.Chunk)
        peer.pull(ref.transfer_id, 1, 0)  # again from the start: refused, nothing queued
        refused = _error(peer)
        assert refused.code is ErrorCode.BAD_REQUEST and "continues at token 32" in refused.message
        peer.send(wire.Abort(ref.transfer_id, "done testing"))  # the owner may abort
        deadline = time.monotonic() + 2
        while sender.state(ref.transfer_id) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.state(ref.transfer_id) is None and sender.table.unread == {}
    finally:
        peer.close()


def test_a_receiver_that_died_mid_pull_does_not_pin_the_transfer(cfg):
    spool = BlockPool(64, cfg.block_tokens, HIDDEN, torch.float32, name="tx")
    with SenderEndpoint(spool, cfg.replace(ttl_s=0.4)) as sender:
        ref = sender.register(torch.randn(64, HIDDEN))
        dead = Peer(sender.address)
        dead.pull(ref.transfer_id, 0, 0)
        assert isinstance(dead.reply()[0], wire.Chunk)
        dead.close()  # gone without DONE or ABORT
        deadline = time.monotonic() + 3  # the absolute lifetime is 2 x ttl_s
        while spool.used_blocks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool.used_blocks == 0 and sender.table.unread == {}
        other = Peer(sender.address)
        try:
            other.pull(ref.transfer_id, 0, 0)
            assert _error(other).code is ErrorCode.EXPIRED
        finally:
            other.close()


def test_unread_bytes_per_receiver_are_bounded_and_confirmed_by_the_next_pull(sender, cfg):
    bound = cfg.unread_bound_tokens * sender.pool.bytes_per_token  # two windows of 32 tokens
    refs = [sender.register(torch.randn(64, HIDDEN)) for _ in range(4)]
    peer = Peer(sender.address)
    try:
        for ref in refs:  # four first chunks asked for, none read yet
            peer.pull(ref.transfer_id, 0, 0)
        time.sleep(0.3)
        assert max(sender.table.unread.values()) == bound
        replies = [peer.reply() for _ in refs]
        assert [type(m) for m, _ in replies] == [wire.Chunk, wire.Chunk, wire.Error, wire.Error]
        assert all(m.code is ErrorCode.BUSY and "not confirmed read" in m.message for m, _ in replies[2:])
        # a PULL that continues a transfer confirms its chunk was read (the next one takes its place)
        peer.pull(refs[0].transfer_id, 1, 32)
        assert isinstance(peer.reply()[0], wire.Chunk)
        assert max(sender.table.unread.values()) == bound
        # an ended transfer's chunks count no more: room for another
        peer.send(wire.Abort(refs[1].transfer_id, "read it"))
        peer.pull(refs[2].transfer_id, 0, 0)
        assert isinstance(peer.reply()[0], wire.Chunk)
        assert max(sender.table.unread.values()) == bound
        for ref in refs:
            peer.send(wire.Abort(ref.transfer_id, "done testing"))
        deadline = time.monotonic() + 2
        while sender.table.unread and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.table.unread == {}
    finally:
        peer.close()


def test_a_receiver_allowed_one_chunk_larger_than_the_bound(sender, cfg):
    """The bound never stops a receiver whose window exceeds it: one chunk always goes out."""
    data = torch.randn(200, HIDDEN)
    ref = sender.register(data)
    peer = Peer(sender.address)
    try:
        peer.pull(ref.transfer_id, 0, 0, cap=200)
        chunk, payload = peer.reply()
        assert isinstance(chunk, wire.Chunk) and chunk.num_tokens == 200
        peer.send(wire.Done(ref.transfer_id, 1))
        assert isinstance(peer.reply()[0], wire.Ack)
    finally:
        peer.close()


# ---- the reported case, in a sender process of its own: RSS measured -----------------------------------
BIG_HIDDEN = 512  # float32: 2 KiB per token, 2 MiB per 1024-token chunk (the issue's ~2 MiB per PULL)


def test_200_unread_pulls_do_not_grow_the_sender():
    """200 PULLs for one 8100-token id from a connection that never reads them grew the encoder by 390 MiB
    (ZeroMQ's 1000-message queue per connection was the only bound); then 8 more embeddings pulled at
    once on the same connection. The sender queues at most two windows (4 MiB) to it; its RSS is checked."""
    config = TransferConfig(block_tokens=128, default_window_tokens=1024, max_embed_tokens=8192, pool_blocks=8)
    proc = SenderProcess(config, blocks=128, hidden=BIG_HIDDEN, dtype="float32")
    peer = Peer(proc.address, rcvhwm=1)  # reads nothing: the bytes would stay queued in the sender
    try:
        big = EmbedRef.from_json(proc.call("register", 1, 8100))
        small = [EmbedRef.from_json(proc.call("register", 2 + i, 1024)) for i in range(7)]
        time.sleep(0.5)
        before = rss_kib(proc.proc.pid)
        for seq in range(200):
            peer.pull(big.transfer_id, seq, 0, cap=1024)
        for ref in small:
            peer.pull(ref.transfer_id, 0, 0, cap=1024)
        time.sleep(2.0)
        grown_mib = (rss_kib(proc.proc.pid) - before) / 1024
        unread = proc.call("unread")
        print(f"sender RSS grew {grown_mib:.1f} MiB; {unread} bytes queued unread to the peer")
        assert unread <= 2 * 1024 * BIG_HIDDEN * 4
        assert grown_mib < 48, f"sender RSS grew {grown_mib:.1f} MiB"
    finally:
        peer.close()
        assert proc.stop() == 0
