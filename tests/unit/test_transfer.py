"""Sender and receiver end to end: separate processes (over the host link; shm: test_transport_shm.py),
continuations, exhaustion, TTL, pulls before registration, and hostile frames against a live endpoint."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from mmtransfer import (
    BlockPool,
    EmbedRef,
    PoolExhausted,
    ProtocolError,
    Receiver,
    RequestTooLarge,
    SenderEndpoint,
    TransferConfig,
    TransferNotFound,
    TransferObserver,
    TransferState,
    TransferTimeout,
    wire,
)
from mmtransfer.ref import new_transfer_id

from ._sender_proc import SenderProcess as _SenderProcess
from ._sender_proc import embedding_for

HIDDEN = 48


# ---- a sender in another process ----------------------------------------------------------
class SenderProcess(_SenderProcess):
    def __init__(self, config: TransferConfig, blocks: int, dtype: str) -> None:
        super().__init__(config, blocks, HIDDEN, dtype)


@pytest.fixture(scope="module")
def proc_config():
    return TransferConfig(block_tokens=16, default_window_tokens=64, max_embed_tokens=4096, pool_blocks=8)


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def sender_proc(request, proc_config):
    proc = SenderProcess(proc_config, blocks=512, dtype=request.param)
    proc.dtype = request.param
    yield proc
    assert proc.stop() == 0, "sender process leaked blocks"


@pytest.mark.parametrize("tokens, chunks", [(1, 1), (64, 1), (65, 2), (128, 2), (129, 3), (3200, 50), (3201, 51)])
def test_cross_process_bit_exact_with_continuations(sender_proc, proc_config, tokens, chunks):
    pool = BlockPool(8, proc_config.block_tokens, HIDDEN, getattr(torch, sender_proc.dtype), name="rx")
    with Receiver(pool, proc_config.replace(use_size_hint=False, transport="host")) as rx:
        ref = EmbedRef.from_json(sender_proc.call("register", tokens, tokens))
        got = rx.pull(ref, request_id="r1")
    expected = embedding_for(tokens, tokens, HIDDEN, sender_proc.dtype)
    assert torch.equal(got.embedding.view(torch.uint8), expected.view(torch.uint8))
    assert got.record.chunks == chunks and got.record.continuations == chunks - 1
    assert got.aux.extras == {"grid_thw": [1, 2, tokens]}
    assert pool.used_blocks == 0
    assert sender_proc.call("used") == 0


def test_cross_process_pull_waits_for_late_fill(sender_proc, proc_config):
    pool = BlockPool(8, proc_config.block_tokens, HIDDEN, getattr(torch, sender_proc.dtype))
    ref = EmbedRef.from_json(sender_proc.call("reserve"))
    threading.Timer(0.3, sender_proc.call, args=("fill", ref.transfer_id, 7, 100)).start()
    with Receiver(pool, proc_config.replace(transport="host")) as rx:
        got = rx.pull(ref)
    assert torch.equal(got.embedding, embedding_for(7, 100, HIDDEN, sender_proc.dtype))
    assert got.record.chunks == 2 and pool.used_blocks == 0


# ---- in-process endpoints ---------------------------------------------------------------------
@pytest.fixture
def cfg():
    return TransferConfig(
        block_tokens=8,
        default_window_tokens=32,
        max_embed_tokens=512,
        pool_blocks=4,
        alloc_timeout_s=0.5,
        pull_timeout_s=2.0,
        pull_wait_s=0.5,
        ttl_s=5.0,
    )


@pytest.fixture
def pair(cfg):
    """A sender and a receiver pool; both must be whole again after the test."""
    spool = BlockPool(256, cfg.block_tokens, HIDDEN, torch.float32, name="tx")
    rpool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, torch.float32, name="rx")
    sender = SenderEndpoint(spool, cfg)
    receiver = Receiver(rpool, cfg)
    yield sender, receiver
    deadline = time.monotonic() + 2
    while (spool.used_blocks or rpool.used_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spool.used_blocks == 0 and rpool.used_blocks == 0, "leaked blocks"
    sender.close()
    receiver.close()


class Counting(TransferObserver):
    def __init__(self):
        self.done, self.failed = [], []

    def transfer_completed(self, record):
        self.done.append(record)

    def transfer_failed(self, cause):
        self.failed.append(cause)


@pytest.mark.parametrize("window_factor", [0.5, 1, 2, 50])
def test_lengths_up_to_50x_window(pair, cfg, window_factor):
    sender, receiver = pair
    receiver.config = cfg.replace(use_size_hint=False)
    tokens = max(1, int(cfg.default_window_tokens * window_factor))
    sender.config = cfg.replace(max_embed_tokens=4096)
    receiver.config = receiver.config.replace(max_embed_tokens=4096)
    data = torch.randn(tokens, HIDDEN)
    got = receiver.pull(sender.register(data))
    assert torch.equal(got.embedding, data)
    assert got.record.chunks == len(wire.chunk_plan(tokens, cfg.default_window_tokens))


def test_size_hint_shrinks_the_window(pair):
    sender, receiver = pair
    got = receiver.pull(sender.register(torch.randn(5, HIDDEN)))
    assert got.record.window_blocks == 1


def test_receiver_window_shrinks_when_pool_is_short(pair, cfg):
    sender, receiver = pair
    receiver.config = cfg.replace(use_size_hint=False)
    hog = receiver.pool.alloc(3)  # only one of four blocks left
    data = torch.randn(40, HIDDEN)
    got = receiver.pull(sender.register(data))
    receiver.pool.free(hog)
    assert torch.equal(got.embedding, data)
    assert got.record.window_blocks == 1 and got.record.chunks == 5


def test_receiver_pool_exhausted_waits_then_proceeds(pair):
    sender, receiver = pair
    hog = receiver.pool.alloc(4)
    threading.Timer(0.2, receiver.pool.free, args=(hog,)).start()
    data = torch.randn(20, HIDDEN)
    assert torch.equal(receiver.pull(sender.register(data)).embedding, data)


def test_receiver_pool_exhausted_times_out_clearly(pair):
    sender, receiver = pair
    obs = Counting()
    receiver.observer = obs
    hog = receiver.pool.alloc(4)
    ref = sender.register(torch.randn(20, HIDDEN))
    with pytest.raises(PoolExhausted, match="in use"):
        receiver.pull(ref)
    receiver.pool.free(hog)
    assert obs.failed == ["pool_exhausted"]
    assert sender.discard(ref.transfer_id)  # never asked for, so the sender still holds it


def test_sender_pool_exhausted_times_out_and_frees(pair):
    sender, _ = pair
    hog = sender.pool.alloc(250)
    with pytest.raises(PoolExhausted):
        sender.register(torch.randn(64, HIDDEN))
    sender.pool.free(hog)
    assert sender.active_transfers == 0


def test_too_large_embedding_is_refused_by_both_sides(pair, cfg):
    sender, receiver = pair
    with pytest.raises(RequestTooLarge, match="max_embed_tokens"):
        sender.register(torch.randn(cfg.max_embed_tokens + 1, HIDDEN))
    receiver.config = cfg.replace(max_embed_tokens=16)
    with pytest.raises(RequestTooLarge):
        receiver.pull(sender.register(torch.randn(17, HIDDEN)))
    time.sleep(0.1)
    assert sender.active_transfers == 0  # the receiver's ABORT freed the sender's blocks


def test_aux_the_receiver_would_refuse_is_refused_at_fill_and_frees(pair):
    sender, _ = pair
    too_many = {f"k{i}": [i] for i in range(wire.Aux.MAX_EXTRAS + 1)}
    with pytest.raises(ProtocolError, match="extras"):
        sender.register(torch.randn(9, HIDDEN), extras=too_many)
    assert sender.pool.used_blocks == 0 and sender.active_transfers == 0


def test_ttl_reclaims_never_pulled_embeddings(pair, cfg):
    sender, receiver = pair
    obs = Counting()
    sender.observer = obs
    sender.config = cfg.replace(ttl_s=0.2)
    ref = sender.register(torch.randn(30, HIDDEN))
    assert sender.pool.used_blocks == 4
    time.sleep(0.5)
    assert sender.pool.used_blocks == 0 and sender.state(ref.transfer_id) is None
    assert obs.failed == ["ttl"]
    with pytest.raises(TransferNotFound):
        receiver.pull(ref)


def test_pull_for_reservation_never_filled_times_out(pair):
    sender, receiver = pair
    ref = sender.reserve("slow-encoder")
    assert sender.state(ref.transfer_id) == TransferState.WAITING_FOR_INPUT
    with pytest.raises(TransferTimeout, match="not ready"):
        receiver.pull(ref)
    sender.discard(ref.transfer_id)


def test_failed_fill_frees_and_answers_waiting_pull(pair):
    sender, receiver = pair
    ref = sender.reserve()
    threading.Timer(0.1, lambda: pytest.raises(ValueError, sender.fill, ref.transfer_id, torch.zeros(3, 7))).start()
    with pytest.raises(TransferNotFound):
        receiver.pull(ref)


def test_unknown_and_forged_ids_are_not_found(pair):
    sender, receiver = pair
    with pytest.raises(TransferNotFound):
        receiver.pull(EmbedRef(new_transfer_id(), sender.address, 10))


def test_sender_gone_times_out(cfg):
    rpool = BlockPool(4, cfg.block_tokens, HIDDEN, torch.float32)
    with Receiver(rpool, cfg.replace(pull_timeout_s=0.3)) as receiver:
        with pytest.raises(TransferTimeout, match="no answer"):
            receiver.pull(EmbedRef(new_transfer_id(), "tcp://127.0.0.1:9", 10))
    assert rpool.used_blocks == 0


def test_observer_counts_bytes_and_continuations(pair):
    sender, receiver = pair
    obs = Counting()
    receiver.observer = obs
    receiver.pull(sender.register(torch.randn(70, HIDDEN)))
    (record,) = obs.done
    assert record.tokens == 70 and record.nbytes == 70 * HIDDEN * 4 and record.continuations == 2


def test_concurrent_pulls_share_the_pools(pair, cfg):
    sender, receiver = pair
    datas = [torch.randn(n, HIDDEN) for n in (3, 33, 64, 100, 7, 90, 41, 12)]
    refs = [sender.register(d) for d in datas]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        results[i] = receiver.pull(refs[i]).embedding

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(refs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(torch.equal(results[i], d) for i, d in enumerate(datas))


# ---- hostile frames against a live endpoint ------------------------------------------------
def _raw_exchange(address: str, frames: list[bytes], expect_reply: bool = True):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        if not expect_reply:
            return None
        assert sock.poll(2000), "endpoint stopped answering"
        return wire.decode(sock.recv_multipart()[0])
    finally:
        sock.close()


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"garbage",
        b"MMTX\x01\x01{}",
        b"MMTX\x02\x01{}",
        b"MMTX\x03\x01{}",
        b"MMTX\x01\x09{}",
        b"\x00" * 70000,
        wire.encode(wire.Ack(new_transfer_id(), 0)),
    ],
)
def test_endpoint_answers_garbage_with_error_and_keeps_serving(pair, frame):
    sender, receiver = pair
    reply = _raw_exchange(sender.address, [frame])
    # a frame of an earlier protocol version (1, 2) is told so, not just "bad request"
    old = frame.startswith((b"MMTX\x01", b"MMTX\x02"))
    expected = wire.ErrorCode.VERSION if old else wire.ErrorCode.BAD_REQUEST
    assert isinstance(reply, wire.Error) and reply.code == expected
    data = torch.randn(9, HIDDEN)
    assert torch.equal(receiver.pull(sender.register(data)).embedding, data)


def test_pull_past_the_end_is_bad_request_and_transfer_survives(pair):
    sender, receiver = pair
    data = torch.randn(10, HIDDEN)
    ref = sender.register(data)
    reply = _raw_exchange(sender.address, [wire.encode(wire.Pull(ref.transfer_id, 0, 10, 8))])
    assert isinstance(reply, wire.Error) and "not below the total" in reply.message
    assert torch.equal(receiver.pull(ref).embedding, data)


def test_abort_frees_sender_blocks(pair):
    sender, _ = pair
    ref = sender.register(torch.randn(20, HIDDEN))
    _raw_exchange(sender.address, [wire.encode(wire.Abort(ref.transfer_id, "test"))], expect_reply=False)
    deadline = time.monotonic() + 2
    while sender.state(ref.transfer_id) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.state(ref.transfer_id) is None
