"""NCCL faults for real (2 GPUs): a communicator whose transfer never completes is aborted (ncclCommAbort) on
both sides within the configured timeout, nothing stays allocated, and the pair works again on a new
communicator. The same mechanism is unit-tested on the CPU with the in-process NCCL stand-in
(tests/unit/test_transport_channels.py); this runs it against libnccl.

* lost sends: the sender answers CHUNK but posts no send; the receiver's bytes never land, its bounded
  event wait (pull_timeout_s) gives up, it drains (bounded), aborts its communicator, sends CLOSE (the
  sender aborts its side) and ABORT (the sender frees the blocks); the next pull bootstraps a new one.
* a receiver that vanishes: the receiver posts no receive; the sender's sends never complete, and after
  pull_timeout_s the sender aborts the channel and frees the blocks; the receiver's next pull finds the
  channel unknown, reopens it once, and works.

Skipped without CUDA (tests/conftest.py) and with fewer than two GPUs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from mmtransfer import BlockPool, ChannelError, EmbedRef, Receiver, TransferConfig, dtype_from_name
from mmtransfer.receiver_pull import PullRun

from ._fault_procs import fault_sender_main
from ._procs import embedding_for

pytestmark = pytest.mark.gpu
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

HIDDEN, DTYPE, TIMEOUT_S = 1024, "bfloat16", 3.0


def _config(**kw) -> TransferConfig:
    base = dict(
        block_tokens=128,
        default_window_tokens=1024,
        pool_blocks=64,
        max_embed_tokens=16384,
        use_size_hint=False,
        pull_timeout_s=TIMEOUT_S,
        bootstrap_timeout_s=120,
        ttl_s=60,
    )
    base.update(kw)
    return TransferConfig(**base)


class FaultSender:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=fault_sender_main,
            daemon=True,
            args=(self.commands, self.replies, _config(), 512, HIDDEN, DTYPE, "cuda:0"),
        )
        self.proc.start()
        kind, self.address = self.replies.get(timeout=120)
        assert kind == "ready", (kind, self.address)

    def call(self, *cmd):
        self.commands.put(cmd)
        kind, value = self.replies.get(timeout=120)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def stop(self) -> int:
        self.commands.put(("stop",))
        kind, used = self.replies.get(timeout=60)
        self.proc.join(timeout=10)
        return used


@pytest.fixture(scope="module")
def sender():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("NCCL between two GPUs needs 2 GPUs")
    proc = FaultSender()
    yield proc
    assert proc.stop() == 0, "sender process leaked blocks"


@pytest.fixture
def receiver():
    pool = BlockPool(64, 128, HIDDEN, dtype_from_name(DTYPE), "cuda:1", name="rx-faults")
    rx = Receiver(pool, _config(transport="nccl"), name="rx-faults")
    yield rx
    assert pool.used_blocks == 0, "receiver leaked blocks"
    rx.close()


def _pull_ok(sender, rx, seed: int, tokens: int = 2500) -> None:
    got = rx.pull(EmbedRef.from_json(sender.call("register", seed, tokens)))
    expected = embedding_for(seed, tokens, HIDDEN, dtype_from_name(DTYPE))
    assert torch.equal(got.embedding.cpu().view(torch.int16), expected.view(torch.int16)), "bytes differ"
    assert got.record.transport == "nccl"


def test_lost_sends_abort_the_communicator_and_the_pair_recovers(sender, receiver):
    _pull_ok(sender, receiver, 1)
    old = receiver.link_for(sender.address)
    sender.call("drop_sends", 3)  # all three chunks of the next pull: no bytes behind any CHUNK
    ref = EmbedRef.from_json(sender.call("register", 2, 2500))
    start = time.monotonic()
    with pytest.raises(ChannelError, match="not landed within"):
        receiver.pull(ref)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + min(TIMEOUT_S, 10) + 10, f"gave up after {elapsed:.1f}s"
    assert old.broken and old.comm is None  # ncclCommAbort done on the receiver's side
    assert sender.call("used") == 0  # ABORT: the sender freed the embedding's blocks
    deadline = time.monotonic() + 10
    while sender.call("channels") and time.monotonic() < deadline:  # CLOSE: the sender aborted its side
        time.sleep(0.1)
    assert sender.call("channels") == 0
    for seed in (3, 4, 5):  # a new communicator, bootstrapped and warmed up by the next pull
        _pull_ok(sender, receiver, seed)
    new = receiver.link_for(sender.address)
    assert new is not old and not new.broken and sender.call("channels") == 1


def test_a_receiver_that_vanishes_mid_transfer_leaves_nothing_behind(sender, monkeypatch):
    """The receiver dies after its PULL was answered (its communicator is torn down, no CLOSE, no ABORT, no
    DONE reach the sender): the sender reclaims the embedding after ttl_s; if its sends never complete (the
    peer is gone) it aborts the channel after pull_timeout_s and frees the blocks anyway. A new receiver
    (a restarted language instance) then works on a new communicator."""
    sender.call("config", {"ttl_s": 5.0})
    try:
        pool = BlockPool(64, 128, HIDDEN, dtype_from_name(DTYPE), "cuda:1", name="rx-vanish")
        rx = Receiver(pool, _config(transport="nccl"), name="rx-vanish")
        _pull_ok(sender, rx, 6)
        channel = rx.link_for(sender.address)

        def vanish(pieces, dests, frames):  # at its first CHUNK: the process "dies", its communicator with it
            channel.close()
            raise RuntimeError("receiver process died")

        monkeypatch.setattr(channel, "post", vanish)
        monkeypatch.setattr(rx.links, "drop", lambda *a, **k: None)  # a dead process sends nothing more
        monkeypatch.setattr(PullRun, "_abort", lambda *a, **k: None)
        with pytest.raises(RuntimeError, match="died"):
            rx.pull(EmbedRef.from_json(sender.call("register", 7, 6000)))
        monkeypatch.undo()
        start = time.monotonic()
        while sender.call("used") and time.monotonic() - start < 5.0 + TIMEOUT_S + 15:  # each call waits <= 10 s
            pass
        assert sender.call("used") == 0, "the sender kept the blocks of a receiver that died"  # TTL [+ abort]
        rx.links._links.clear()  # dead: no CLOSE at close()
        rx.close()
        assert pool.used_blocks == 0
        fresh = Receiver(
            BlockPool(64, 128, HIDDEN, dtype_from_name(DTYPE), "cuda:1", name="rx-new"),
            _config(transport="nccl"),
            name="rx-new",
        )
        try:
            for seed in (8, 9):
                _pull_ok(sender, fresh, seed)
        finally:
            fresh.close()
    finally:
        sender.call("config", {"ttl_s": 60.0})
