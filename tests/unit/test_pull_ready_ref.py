"""Protocol 3: the EMBED_REF of a ready embedding names its pool rows, so bytes move before any answer.

Same GPU (CUDA IPC, here the process-local mapping of a CPU pool): the receiver sends a CLAIM naming the rows
and copies from the mapped pool at once, the claim's answer travelling meanwhile; the sender ACKs only its own
transfer's rows, and the DONE after the copy frees the blocks with no answer. NCCL (the
in-process stand-in of test_transport_channels): the receiver posts the first chunk's receives right after its
PULL (``early``), the sender posts the matching sends, or zeros of the same lengths when it refuses the PULL, so
the channel's pairing holds. Every path frees both sides' blocks; forged rows read nothing they should not."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import zmq

from mmtransfer import EmbedRef, ProtocolError, RemoteError, TransferError, VersionMismatch, wire
from mmtransfer.ref import MAX_REF_BYTES, MAX_REF_ROWS, new_transfer_id

from .test_transport_channels import GPU_A, GPU_B, HIDDEN, _data, _eventually, _fragment, _Pair, fake_nccl  # noqa: F401

TID = "0123456789abcdef0123456789abcdef"
AUX = wire.Aux(40, HIDDEN, "bfloat16", {"grid_thw": [1, 4, 10]})


# ---- the wire --------------------------------------------------------------------------------------
def test_protocol_3_refuses_frames_and_refs_of_version_2_clearly():
    assert wire.PROTOCOL_VERSION == 3
    frame = bytearray(wire.encode(wire.Done(TID, 0)))
    frame[4] = 2
    with pytest.raises(VersionMismatch, match="protocol version 2, this endpoint speaks 3"):
        wire.decode(bytes(frame))
    old = json.dumps({"transfer_id": TID, "address": "tcp://a:1", "num_tokens": 4, "version": 2})
    with pytest.raises(VersionMismatch, match="version 2, expected 3"):
        EmbedRef.from_json(old)


def test_new_fields_round_trip_and_stay_off_the_wire_by_default():
    pull = wire.Pull(TID, 0, 0, 32, "nccl", "", channel=TID, count=0, runs=(16, 16), early=(5, 11, 16))
    claim = wire.Claim(TID, 0, rows=((0, 8), (40, 32)))
    assert wire.decode(wire.encode(pull)) == pull and wire.decode(wire.encode(claim)) == claim
    assert b"early" not in wire.encode(wire.Pull(TID, 0, 0, 8))
    bad = wire.encode(wire.Claim(TID, 0, rows=((-1, 8),)))
    with pytest.raises(ProtocolError, match="rows"):
        wire.decode(bad)


def test_ready_ref_round_trips_and_is_validated():
    ref = EmbedRef(TID, "tcp://127.0.0.1:5", 40, rows=((16, 24), (0, 16)), aux=AUX)
    assert EmbedRef.from_json(ref.to_json()) == ref and ref.ready
    assert not EmbedRef(TID, "tcp://127.0.0.1:5", 40).ready
    good = json.loads(ref.to_json())
    for broken, why in [
        ({**good, "rows": [[16, 24]]}, "disagree"),  # 24 tokens named, 40 announced
        ({k: v for k, v in good.items() if k != "aux"}, "together"),
        ({**good, "rows": []}, "rows"),
        ({**good, "rows": [[0, 1]] * (MAX_REF_ROWS + 1)}, "rows"),
        ({**good, "rows": [[0, 0], [0, 40]]}, "rows"),
        ({**good, "rows": [["0", 40]]}, "rows"),
        ({**good, "aux": {**good["aux"], "hidden": 0}}, "aux.hidden"),
        ({**good, "extra": 1}, "expected fields"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            EmbedRef.from_json(json.dumps(broken))


def test_a_ref_whose_rows_do_not_fit_1_kib_leaves_them_out():
    rows = tuple((i * 10**9, 1) for i in range(MAX_REF_ROWS))
    big = EmbedRef(TID, "tcp://127.0.0.1:5", MAX_REF_ROWS, rows=rows, aux=wire.Aux(MAX_REF_ROWS, 8, "bfloat16"))
    assert len(big.to_json()) > MAX_REF_BYTES
    fitted = big.fitted()
    assert not fitted.ready and fitted.transfer_id == TID and len(fitted.to_json()) <= MAX_REF_BYTES


def test_pieces_from_the_ref_equal_the_senders_pieces():
    rows = [(100, 5), (7, 30), (300, 12)]
    assert wire.slice_runs(rows, 3, 10) == [(103, 2), (7, 8)]
    assert wire.chunk_pieces(rows, 0, 47, (16, 16, 15)) == [(100, 5), (7, 11), (18, 16), (34, 3), (300, 12)]
    assert wire.merge_runs([(0, 8), (8, 8), (40, 8)]) == [(0, 16), (40, 8)]
    with pytest.raises(ProtocolError, match="not inside"):
        wire.slice_runs(rows, 40, 8)


# ---- the sender's refs -----------------------------------------------------------------------------
def test_register_and_publish_name_the_rows_reserve_does_not(monkeypatch):
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A)
    try:
        pool = pair.sender_pool
        _fragment(pool, 3)
        data = _data(37, 1)
        ref = EmbedRef.from_json(pair.sender.register(data, {"grid_thw": [1, 1, 37]}).to_json())
        entry = pair.sender.table.get(ref.transfer_id)
        assert ref.ready and ref.num_tokens == 37 and ref.aux == entry.aux
        assert ref.rows == tuple((s.pool_row, s.length) for s in pool.segments(entry.blocks, 37))
        rows = torch.cat([pool.flat_rows[r : r + n] for r, n in ref.rows])
        assert torch.equal(rows, data)  # the rows hold exactly the embedding, in token order
        assert not pair.sender.reserve().ready
        blocks, _ = pair.sender.write_blocks(data)
        published = pair.sender.publish(blocks, 37, None, pool.free)
        assert published.ready and sum(n for _, n in published.rows) == 37
    finally:
        pair.close()


# ---- same GPU: copy at once, only DONE ----------------------------------------------------------------
def _spy(pair, monkeypatch):
    seen: list = []
    real = pair.sender.server.dispatch

    def dispatch(identity, msg):
        seen.append(msg)
        return real(identity, msg)

    monkeypatch.setattr(pair.sender.server, "dispatch", dispatch)
    pair.sender.loop.stop()  # restart the loop with the spy in place
    pair.sender.loop._stop.clear()
    pair.sender.loop.start(pair.sender.server.dispatch, pair.sender.server.tick)
    return seen


@pytest.mark.parametrize("landing", ["direct", "window"])
@pytest.mark.parametrize("tokens", [1, 32, 33, 300])
def test_ipc_reads_the_pool_at_once_with_no_pull(monkeypatch, landing, tokens):
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A, gpu_landing=landing)
    try:
        _fragment(pair.sender_pool, tokens)
        _fragment(pair.receiver_pool, tokens + 1)
        held = pair.receiver_pool.used_blocks
        pair.receiver.pull(pair.sender.register(_data(3, 0)))  # bootstraps the channel (maps the pool)
        seen = _spy(pair, monkeypatch)
        data = _data(tokens, tokens)
        ref = pair.sender.register(data)
        got = pair.receiver.pull(ref)
        assert torch.equal(got.embedding.view(torch.int16), data.view(torch.int16))
        assert got.record.transport == "cuda_ipc" and got.record.chunks == -(-tokens // 32)
        assert pair.receiver_pool.used_blocks == held
        assert _eventually(lambda: pair.sender.active_transfers == 0)  # the DONE frees, unanswered
        mine = [m for m in seen if getattr(m, "transfer_id", "") == ref.transfer_id]
        assert [type(m) for m in mine] == [wire.Claim, wire.Done] and mine[0].rows == ref.rows  # no PULL
        assert {"first_chunk", "ready", "acked"} <= set(got.timings) and "sent" not in got.timings
    finally:
        pair.close()


def test_ipc_ref_without_rows_still_pulls(monkeypatch):
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A)
    try:
        data = _data(70, 5)
        ref = pair.sender.reserve()
        pair.sender.fill(ref.transfer_id, data)
        assert not ref.ready and torch.equal(pair.receiver.pull(ref).embedding, data)
        assert pair.sender.active_transfers == 0
    finally:
        pair.close()


def test_ipc_forged_rows_are_refused_and_read_nothing_handed_out(monkeypatch):
    """A ref naming another transfer's rows (or rows outside the mapped pool) gives the receiver nothing:
    the sender does not ACK a CLAIM whose rows are not its transfer's; the receiver bounds-checks every row."""
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A)
    try:
        secret = pair.sender.register(_data(16, 7))
        mine = pair.sender.register(_data(16, 8))
        forged = EmbedRef(mine.transfer_id, mine.address, 16, rows=secret.rows, aux=mine.aux)
        with pytest.raises(RemoteError, match="not this transfer's blocks"):
            pair.receiver.pull(forged)
        outside = EmbedRef(secret.transfer_id, secret.address, 16, rows=((10**6, 16),), aux=secret.aux)
        with pytest.raises(ProtocolError, match="outside the sender's pool"):
            pair.receiver.pull(outside)
        unknown = EmbedRef(new_transfer_id(), mine.address, 16, rows=mine.rows, aux=mine.aux)
        with pytest.raises(TransferError, match="unknown transfer id"):
            pair.receiver.pull(unknown)
        assert pair.receiver_pool.used_blocks == 0
        # the failed pulls ABORTed what they named (the receiver gives up what it could not take): freed
        assert _eventually(lambda: pair.sender.active_transfers == 0)
        assert _eventually(lambda: pair.sender_pool.used_blocks == 0)
        data = _data(20, 9)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)  # channel kept
    finally:
        pair.close()


def test_claim_rows_are_checked_by_the_sender_and_the_claimed_done_is_unanswered(monkeypatch):
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(pair.sender.address)
    try:
        ref = pair.sender.register(_data(24, 3))
        wrong = ((0, 24),) if ref.rows != ((0, 24),) else ((8, 24),)
        for rows in (wrong, ((ref.rows[0][0], 23),)):
            sock.send(wire.encode(wire.Claim(ref.transfer_id, 0, rows)))
            assert sock.poll(2000)
            reply = wire.decode(sock.recv_multipart()[0])
            assert isinstance(reply, wire.Error) and reply.code is wire.ErrorCode.BAD_REQUEST
        assert pair.sender.active_transfers == 1  # kept for its rightful receiver
        sock.send(wire.encode(wire.Claim(ref.transfer_id, 0, ref.rows)))
        assert sock.poll(2000) and isinstance(wire.decode(sock.recv_multipart()[0]), wire.Ack)
        assert pair.sender.active_transfers == 1  # a claim frees nothing: the copy is still running
        sock.send(wire.encode(wire.Done(ref.transfer_id, 1)))
        assert _eventually(lambda: pair.sender.active_transfers == 0 and pair.sender_pool.used_blocks == 0)
        assert not sock.poll(300)  # no answer: the claiming receiver returned at the claim's ACK
        unclaimed = pair.sender.register(_data(8, 4))
        sock.send(wire.encode(wire.Done(unclaimed.transfer_id, 1)))
        assert sock.poll(2000) and isinstance(wire.decode(sock.recv_multipart()[0]), wire.Ack)  # as before
    finally:
        sock.close(linger=0)
        pair.close()


def test_a_stale_answer_on_a_reused_socket_is_skipped(monkeypatch):
    """A claimed transfer that expires between the CLAIM's ACK and the DONE gets its DONE answered with ERROR,
    which nobody waits for: the socket goes back to the idle list with it. The next pull skips it."""
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A)
    try:
        server, answered = pair.sender.server, []

        def expired_meanwhile(identity, done):
            answered.append(done.transfer_id)
            server.reply_unknown(identity, done.transfer_id, done.seq)

        warm = pair.sender.register(_data(8, 1))
        pair.receiver.pull(warm)  # channel open, one idle socket
        assert _eventually(lambda: pair.sender.state(warm.transfer_id) is None)  # its DONE is in
        real = server.on_done
        monkeypatch.setattr(server, "on_done", expired_meanwhile)
        first = pair.sender.register(_data(16, 2))
        pair.receiver.pull(first)
        assert _eventually(lambda: answered == [first.transfer_id])  # an ERROR now waits in the idle socket
        monkeypatch.setattr(server, "on_done", real)
        (sock,) = pair.receiver.sockets.idle[pair.sender.address]
        data = _data(24, 3)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
        assert pair.receiver.sockets.idle[pair.sender.address] == [sock]  # the same socket, still in step
        pair.sender.discard(first.transfer_id)
    finally:
        pair.close()


# ---- NCCL: receives posted before the first CHUNK -------------------------------------------------------
@pytest.fixture
def nccl(monkeypatch, fake_nccl):  # noqa: F811
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_B, gpu_landing="window")
    yield pair
    pair.close()
    assert fake_nccl.errors() == []


def _pulls(pair, monkeypatch) -> list:
    seen: list = []
    real = pair.sender.server.serve

    def spy(identity, pull, entry):
        seen.append(pull)
        return real(identity, pull, entry)

    monkeypatch.setattr(pair.sender.server, "serve", spy)
    return seen


@pytest.mark.parametrize("tokens", [1, 32, 33, 100])
def test_nccl_posts_the_first_window_before_its_chunk(nccl, monkeypatch, tokens):
    _fragment(nccl.sender_pool, tokens)
    _fragment(nccl.receiver_pool, tokens + 2)
    seen = _pulls(nccl, monkeypatch)
    data = _data(tokens, tokens)
    ref = nccl.sender.register(data)
    got = nccl.receiver.pull(ref)
    assert torch.equal(got.embedding.view(torch.int16), data.view(torch.int16))
    (pull,) = seen
    first = wire.chunk_pieces(ref.rows, 0, min(tokens, 32), pull.runs)
    assert pull.early == tuple(n for _, n in first) and sum(pull.early) == min(tokens, 32)
    assert nccl.sender.active_transfers == 0


def test_nccl_refused_early_pull_is_paired_with_zeros_and_keeps_the_channel(nccl, fake_nccl):  # noqa: F811
    data = _data(50, 1)
    assert torch.equal(nccl.receiver.pull(nccl.sender.register(data)).embedding, data)
    channel = nccl.receiver.link_for(nccl.sender.address)
    gone = nccl.sender.register(data)
    nccl.sender.discard(gone.transfer_id)
    with pytest.raises(TransferError, match="unknown transfer id"):
        nccl.receiver.pull(gone)  # its early receives got zeros: nothing hangs, the pairing holds
    real = nccl.sender.register(data)
    assert len(real.rows) == 1
    ((row, n),) = real.rows
    lying = EmbedRef(real.transfer_id, real.address, 50, rows=((row, 20), (row + 20, 30)), aux=real.aux)
    with pytest.raises(RemoteError, match="early receives"):
        nccl.receiver.pull(lying)  # cut otherwise than the sender cuts: refused, paired with zeros
    assert not channel.broken and nccl.receiver.link_for(nccl.sender.address) is channel
    assert torch.equal(nccl.receiver.pull(nccl.sender.register(data)).embedding, data)
    assert nccl.receiver_pool.used_blocks == 0 and len(fake_nccl.worlds) == 1
    # rows cut alike but elsewhere: the sender sends its own transfer's bytes, and the receiver refuses a
    # first CHUNK whose pieces are not the ones it posted (its bytes are not handed out; the channel reopens)
    real = nccl.sender.register(data)
    ((row, n),) = real.rows
    shifted = EmbedRef(real.transfer_id, real.address, 50, rows=((row + 1, 50),), aux=real.aux)
    with pytest.raises(ProtocolError, match="differ from the receives posted early"):
        nccl.receiver.pull(shifted)
    assert channel.broken and nccl.receiver_pool.used_blocks == 0
    assert torch.equal(nccl.receiver.pull(nccl.sender.register(data)).embedding, data)
    assert _eventually(lambda: nccl.sender.active_transfers == 0)


def test_fake_nccl_reports_receives_that_would_hang(fake_nccl):  # noqa: F811
    """The stand-in itself: a receive posted with no send and no abort is reported (a hang on a GPU)."""
    from mmtransfer import nccl_lib

    lib = nccl_lib.load()
    uid = lib.get_unique_id()
    import threading

    comms = {}
    threads = [threading.Thread(target=lambda r=r: comms.setdefault(r, lib.comm_init_rank(2, uid, r))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    buf = torch.zeros(8, dtype=torch.uint8)
    lib.recv(buf.data_ptr(), 8, 0, comms[1], 0)
    assert fake_nccl.errors() and "hang" in fake_nccl.errors()[0]
    src = torch.arange(8, dtype=torch.uint8)
    lib.send(src.data_ptr(), 8, 1, comms[0], 0)
    assert fake_nccl.errors() == [] and torch.equal(buf, src)


def test_struct_header_is_unchanged():
    assert wire.HEADER.size == struct.calcsize("!4sBB")


# ---- host link: the payload is the embedding ------------------------------------------------------------
@pytest.mark.parametrize("tokens", [7, 32, 33, 100])
def test_host_pull_lands_once_or_adopts_the_payload(tokens):
    """One chunk into a CPU pool: the embedding is the received payload itself (writable, no copy); more chunks
    are copied once each, straight into the embedding. Both sides free everything."""
    from mmtransfer import BlockPool, Receiver, SenderEndpoint, TransferConfig

    cfg = TransferConfig(
        block_tokens=8, default_window_tokens=32, pool_blocks=64, max_embed_tokens=4096, transport="host"
    )
    sender = SenderEndpoint(BlockPool(64, 8, HIDDEN, torch.bfloat16, name="s"), cfg, name="s")
    receiver = Receiver(BlockPool(16, 8, HIDDEN, torch.bfloat16, name="r"), cfg, name="r")
    try:
        data = _data(tokens, tokens)
        got = receiver.pull(sender.register(data))
        assert torch.equal(got.embedding.view(torch.int16), data.view(torch.int16))
        assert got.record.transport == "host" and got.record.chunks == -(-tokens // 32)
        got.embedding.add_(1)  # writable, whichever way it landed
        assert receiver.pool.used_blocks == 0 and _eventually(lambda: sender.pool.used_blocks == 0)
    finally:
        receiver.close()
        sender.close()
