"""The shm transport: two CPU pools on one host, the receiver mapping the sender's memfd-backed pool.

Every CPU pool lives in a memfd region (nothing in /dev/shm); a receiver on ``auto`` bootstraps once per
sender, maps the pool read-only from ``/proc/<pid>/fd/<fd>`` and copies a ready ref's rows at once (CLAIM,
copy, DONE), or pulls a reserved one chunk by chunk over the channel. Where the mapping cannot be formed it
falls back to the host link with one warning; forged rows read nothing; every path frees both pools."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

import pytest
import torch

from mmtransfer import (
    BlockPool,
    EmbedRef,
    ProtocolError,
    Receiver,
    RemoteError,
    SenderEndpoint,
    TransferCancelled,
    TransferConfig,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
    memfd,
    wire,
)
from mmtransfer.device import DeviceInfo
from mmtransfer.enums import Transport
from mmtransfer.transports.shm import ShmReceiverLink, ShmSenderLink

from ._sender_proc import SenderProcess, embedding_for

HIDDEN = 40


def _cfg(**kw) -> TransferConfig:
    base = dict(
        block_tokens=8,
        default_window_tokens=32,
        pool_blocks=32,
        max_embed_tokens=4096,
        pull_timeout_s=5.0,
        alloc_timeout_s=1.0,
        pull_wait_s=0.3,
        bootstrap_timeout_s=5.0,
    )
    base.update(kw)
    return TransferConfig(**base)


def _eventually(cond, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _data(tokens: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


class _Pair:
    """A sender endpoint and a receiver in this process, both on CPU pools (no monkeypatching: real shm)."""

    def __init__(self, sender_transport: str = "auto", receiver_transport: str = "auto", dtype=torch.bfloat16):
        cfg = _cfg()
        self.sender_pool = BlockPool(256, cfg.block_tokens, HIDDEN, dtype, name="s")
        self.receiver_pool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, dtype, name="r")
        self.sender = SenderEndpoint(self.sender_pool, cfg.replace(transport=sender_transport), name="s")
        self.receiver = Receiver(self.receiver_pool, cfg.replace(transport=receiver_transport), name="r")

    def idle(self) -> bool:
        """Both pools whole again, no transfer left on the sender."""
        return _eventually(
            lambda: self.sender.active_transfers == 0
            and self.sender_pool.used_blocks == 0
            and self.receiver_pool.used_blocks == 0
        )

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()


@pytest.fixture
def pair():
    p = _Pair()
    yield p
    p.close()


# ---- the pool's storage ------------------------------------------------------------------------------
def test_cpu_pools_live_in_a_memfd_region_another_mapping_sees_and_dev_shm_stays_empty():
    before = set(os.listdir("/dev/shm"))
    pool = BlockPool(4, 8, HIDDEN, torch.bfloat16, name="p")
    exp = pool.shm_export()
    assert exp["pid"] == os.getpid() and exp["rows"] == 32 and exp["hidden"] == HIDDEN
    assert exp["dtype"] == "bfloat16" and exp["size_bytes"] == 32 * HIDDEN * 2
    assert os.readlink(f"/proc/self/fd/{exp['fd']}").startswith("/memfd:mmtransfer-pool")
    assert wire.fields.shm("shm", exp) == exp  # what the BOOTSTRAP_ACK carries validates
    pool.flat_rows[3] = 1.5
    view = memfd.map_readonly(exp)
    assert not view.flags.writeable
    row = torch.from_numpy(view.copy()).view(torch.bfloat16).view(32, HIDDEN)[3]
    assert torch.equal(row, pool.flat_rows[3])
    assert set(os.listdir("/dev/shm")) == before
    assert memfd.still_exported(exp)
    del pool, view
    gc.collect()
    assert not memfd.still_exported(exp)  # the descriptor closed with the pool: nothing to map any more
    with pytest.raises((OSError, ValueError)):
        memfd.map_readonly(exp)


def test_a_wrong_inode_or_size_is_refused():
    pool = BlockPool(2, 8, HIDDEN, name="p")
    exp = pool.shm_export()
    for bad in ({**exp, "inode": exp["inode"] + 1}, {**exp, "size_bytes": exp["size_bytes"] + 4}):
        with pytest.raises(ValueError, match="not the exported pool"):
            memfd.map_readonly(bad)


# ---- two processes -----------------------------------------------------------------------------------
PROC_CFG = _cfg(default_window_tokens=64, block_tokens=16, pool_blocks=8)


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def sender_proc(request):
    proc = SenderProcess(PROC_CFG, 256, HIDDEN, request.param)
    proc.dtype = request.param
    yield proc
    assert proc.stop() == 0, "sender process leaked blocks"


def _proc_idle(proc) -> bool:
    return _eventually(lambda: proc.call("used") == 0)


@pytest.mark.parametrize("tokens, chunks", [(1, 1), (64, 1), (65, 2), (200, 4), (1000, 16)])
def test_cross_process_shm_bit_exact_with_continuations(sender_proc, tokens, chunks):
    dtype = getattr(torch, sender_proc.dtype)
    pool = BlockPool(8, PROC_CFG.block_tokens, HIDDEN, dtype, name="rx")
    with Receiver(pool, PROC_CFG.replace(use_size_hint=False), name="rx") as rx:
        ref = EmbedRef.from_json(sender_proc.call("register", tokens, tokens))
        got = rx.pull(ref, request_id="r1")
        link = rx.link_for(sender_proc.address)
        assert isinstance(link, ShmReceiverLink) and link.desc["pid"] == sender_proc.proc.pid
    expected = embedding_for(tokens, tokens, HIDDEN, sender_proc.dtype)
    assert torch.equal(got.embedding.view(torch.uint8), expected.view(torch.uint8))
    assert got.record.transport == "shm" and got.record.chunks == chunks
    assert got.aux.extras == {"grid_thw": [1, 2, tokens]}
    assert pool.used_blocks == 0 and _proc_idle(sender_proc)


def test_cross_process_reserved_embedding_is_pulled_over_the_channel(sender_proc):
    """A ref without rows (reserve, filled later): PULLs over the shm channel, each CHUNK naming the rows."""
    dtype = getattr(torch, sender_proc.dtype)
    pool = BlockPool(8, PROC_CFG.block_tokens, HIDDEN, dtype, name="rx")
    ref = EmbedRef.from_json(sender_proc.call("reserve"))
    assert not ref.ready
    threading.Timer(0.2, sender_proc.call, args=("fill", ref.transfer_id, 7, 150)).start()
    with Receiver(pool, PROC_CFG.replace(pull_wait_s=5.0), name="rx") as rx:
        got = rx.pull(ref)
    assert torch.equal(
        got.embedding.view(torch.uint8), embedding_for(7, 150, HIDDEN, sender_proc.dtype).view(torch.uint8)
    )
    assert got.record.transport == "shm" and got.record.chunks == 3
    assert pool.used_blocks == 0 and _proc_idle(sender_proc)


# ---- in one process: the paths ------------------------------------------------------------------------
def test_auto_bootstraps_once_per_sender_and_reads_with_no_pull(pair, monkeypatch):
    seen: list = []
    real = pair.sender.server.dispatch
    monkeypatch.setattr(pair.sender.server, "dispatch", lambda identity, msg: seen.append(msg) or real(identity, msg))
    pair.sender.loop.stop()  # restart the loop with the spy in place
    pair.sender.loop._stop.clear()
    pair.sender.loop.start(pair.sender.server.dispatch, pair.sender.server.tick)
    for tokens in (5, 32, 33, 300):
        data = _data(tokens, tokens)
        got = pair.receiver.pull(pair.sender.register(data))
        assert torch.equal(got.embedding.view(torch.int16), data.view(torch.int16))
        assert got.record.transport == "shm" and got.record.chunks == -(-tokens // 32)
    assert pair.idle()  # the last DONE (unanswered: the pull returned at its CLAIM's ACK) is in
    kinds = [type(m) for m in seen]
    assert kinds.count(wire.Bootstrap) == 1 and wire.Pull not in kinds
    assert kinds.count(wire.Claim) == 4 and kinds.count(wire.Done) == 4


def test_concurrent_pulls_share_one_mapping(pair):
    refs = [(pair.sender.register(_data(20 + i, i)), _data(20 + i, i)) for i in range(8)]
    errors: list = []

    def pull(ref, data):
        try:
            assert torch.equal(pair.receiver.pull(ref).embedding, data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=item) for item in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and pair.idle() and len(pair.sender.channels.links) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(dtype):
    p = _Pair(dtype=dtype)
    try:
        data = _data(77, 9, dtype)
        got = p.receiver.pull(p.sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "shm" and p.idle()
    finally:
        p.close()


def test_forged_rows_are_refused_and_free_everything(pair):
    secret = pair.sender.register(_data(16, 7))
    mine = pair.sender.register(_data(16, 8))
    forged = EmbedRef(mine.transfer_id, mine.address, 16, rows=secret.rows, aux=mine.aux)
    with pytest.raises(RemoteError, match="not this transfer's blocks"):  # the NACKed claim
        pair.receiver.pull(forged)
    outside = EmbedRef(
        secret.transfer_id, secret.address, 16, rows=((pair.sender_pool.flat_rows.shape[0] - 8, 16),), aux=secret.aux
    )
    with pytest.raises(ProtocolError, match="outside the sender's pool"):
        pair.receiver.pull(outside)
    assert pair.idle()  # both refused pulls ABORTed what they named
    data = _data(20, 9)
    assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)  # the link is kept
    assert isinstance(pair.receiver.link_for(pair.sender.address), ShmReceiverLink)


def test_abort_cancel_and_timeouts_free_every_block(pair, monkeypatch):
    data = _data(40, 1)
    pair.receiver.pull(pair.sender.register(data))  # the link is open
    ref = pair.sender.register(data)
    pair.receiver.abort(ref, "not needed")
    assert pair.idle()
    with pytest.raises(TransferCancelled):
        pair.receiver.pull(pair.sender.register(data), cancelled=lambda: True)
    assert pair.idle()
    reserved = pair.sender.reserve("never-filled")
    with pytest.raises(TransferError, match="not ready"):  # the channel PULL waits pull_wait_s, then ERROR(timeout)
        pair.receiver.pull(reserved)
    pair.sender.discard(reserved.transfer_id)
    assert pair.idle()
    # the CLAIM is never answered: the pull times out, hands nothing out, ABORTs; the sender frees
    monkeypatch.setattr(pair.sender.server.claims, "on_claim", lambda identity, claim: None)
    pair.receiver.config = pair.receiver.config.replace(pull_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        pair.receiver.pull(pair.sender.register(data))
    assert time.monotonic() - start < 3 and pair.idle()


# ---- when there is no shm link -------------------------------------------------------------------------
def _warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "using the host link" in r.getMessage()
    ]


@pytest.mark.parametrize("bogus", ["fd", "pid", "inode"])
def test_a_pool_that_cannot_be_opened_falls_back_to_host_once(pair, monkeypatch, caplog, bogus):
    """/proc/<pid>/fd/<fd> does not open (another container or uid, a hardened /proc: here a bogus pid or fd),
    or opens another file: the pull succeeds over the host link, with one warning for that sender."""
    real = ShmSenderLink.ack_fields
    change = {"fd": {"fd": 1 << 20}, "pid": {"pid": (1 << 31) - 1}, "inode": {"inode": 1}}[bogus]
    monkeypatch.setattr(ShmSenderLink, "ack_fields", lambda self: {"shm": {**real(self)["shm"], **change}})
    caplog.set_level(logging.INFO)
    for seed in range(3):
        data = _data(50, seed)
        got = pair.receiver.pull(pair.sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "host"
    assert len(_warnings(caplog)) == 1
    assert pair.receiver.link_for(pair.sender.address) is pair.receiver.links.host_link
    assert _eventually(lambda: not pair.sender.channels.links)  # told (CLOSE): the channel it opened is gone
    assert pair.idle()


def test_a_pool_without_memfd_is_served_over_host(monkeypatch, caplog):
    def no_memfd(*args):
        raise OSError(38, "memfd_create blocked")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    p = _Pair()
    try:
        assert p.sender_pool.shm_export() is None and p.sender_pool.region is None
        caplog.set_level(logging.INFO)
        data = _data(40, 3)
        got = p.receiver.pull(p.sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "host"
        assert len(_warnings(caplog)) == 1 and p.idle()
    finally:
        p.close()


def test_an_old_sender_that_answers_host_is_pulled_over_host(monkeypatch, caplog):
    """A protocol-3 sender negotiates host for two CPU pools: its BOOTSTRAP_ACK is taken as it is, no warning."""
    import mmtransfer.sender_serve as serve

    monkeypatch.setattr(serve, "negotiate", lambda *args: Transport.HOST)
    p = _Pair()
    try:
        caplog.set_level(logging.INFO)
        data = _data(70, 4)
        got = p.receiver.pull(p.sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "host"
        assert not _warnings(caplog) and not p.sender.channels.links and p.idle()
    finally:
        p.close()


@pytest.mark.parametrize("sender_transport", ["host", "nccl"])
def test_auto_receiver_of_a_sender_forcing_another_transport_uses_host(sender_transport):
    p = _Pair(sender_transport=sender_transport)
    try:
        data = _data(30, 5)
        got = p.receiver.pull(p.sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "host" and p.idle()
    finally:
        p.close()


def test_host_forced_on_the_receiver_never_bootstraps(monkeypatch):
    p = _Pair(receiver_transport="host")
    called: list = []
    monkeypatch.setattr(p.sender.server, "on_bootstrap", lambda *a: called.append(a))
    try:
        got = p.receiver.pull(p.sender.register(_data(30, 6)))
        assert got.record.transport == "host" and not called and p.idle()
    finally:
        p.close()


def test_shm_forced_across_hosts_is_a_clear_error_and_frees():
    p = _Pair(receiver_transport="shm")
    p.sender.server.device_info = DeviceInfo("cpu", "", "otherhost/1")
    try:
        with pytest.raises(TransportUnavailable, match="shm needs both pools on the same host"):
            p.receiver.pull(p.sender.register(_data(30, 7)))
        assert p.idle()
    finally:
        p.close()


def test_shm_forced_still_falls_back_when_the_pool_cannot_be_mapped(monkeypatch, caplog):
    real = ShmSenderLink.ack_fields
    monkeypatch.setattr(ShmSenderLink, "ack_fields", lambda self: {"shm": {**real(self)["shm"], "fd": 1 << 20}})
    p = _Pair(receiver_transport="shm")
    try:
        caplog.set_level(logging.INFO)
        data = _data(30, 8)
        assert p.receiver.pull(p.sender.register(data)).record.transport == "host"
        assert len(_warnings(caplog)) == 1 and p.idle()
    finally:
        p.close()


def test_a_stale_mapping_is_dropped_and_bootstrapped_again(pair, monkeypatch):
    """The mapped sender's region is gone (it restarted): the next pull bootstraps a new link, never reading a
    new sender's rows from the old mapping."""
    data = _data(30, 9)
    pair.receiver.pull(pair.sender.register(data))
    first = pair.receiver.link_for(pair.sender.address)
    assert first.stale() == ""
    real = memfd.still_exported
    monkeypatch.setattr(memfd, "still_exported", lambda desc: False if desc is first.desc else real(desc))
    got = pair.receiver.pull(pair.sender.register(data))
    assert first.broken and torch.equal(got.embedding, data) and got.record.transport == "shm"
    second = pair.receiver.link_for(pair.sender.address)
    assert second is not first and not second.broken and pair.idle()


def test_a_sender_gone_for_good_releases_its_mapping_when_another_is_bootstrapped():
    """An encoder restarted on another port is never pulled from at its old address: its mapping is dropped
    (and unmapped) when the receiver bootstraps to any sender, not kept for the receiver's life."""
    cfg = _cfg()
    receiver = Receiver(BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, torch.bfloat16, name="r"), cfg, name="r")
    try:
        old = SenderEndpoint(BlockPool(64, cfg.block_tokens, HIDDEN, torch.bfloat16, name="s1"), cfg, name="s1")
        data = _data(30, 10)
        assert receiver.pull(old.register(data)).record.transport == "shm"
        mapped = receiver.link_for(old.address)
        old_address = old.address
        old.close()
        del old
        gc.collect()
        assert mapped.stale()  # the pool (and its descriptor) went with the sender
        new = SenderEndpoint(BlockPool(64, cfg.block_tokens, HIDDEN, torch.bfloat16, name="s2"), cfg, name="s2")
        try:
            assert torch.equal(receiver.pull(new.register(data)).embedding, data)
            assert mapped.broken and mapped.source is None
            assert old_address not in receiver.links._links
        finally:
            new.close()
    finally:
        receiver.close()
