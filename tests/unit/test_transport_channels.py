"""GPU-transport logic on the CPU: negotiation, bootstrap, piece splitting, pipelined continuations,
NCCL ordering under concurrency, failure paths and deferred frees.

The channels run on CPU pools here: an in-process stand-in for libnccl pairs sends and receives
by order per (communicator, direction) exactly like NCCL does, and copies bytes with memmove;
it records any pairing whose sizes differ (what would be corruption or a hang on a GPU).
The same-GPU path uses the process-local mapping of the pool. tests/gpu/ runs the real thing."""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmtransfer.device as mcuda
from mmtransfer import (
    BlockPool,
    ProtocolError,
    Receiver,
    RemoteError,
    SenderEndpoint,
    TransferConfig,
    TransferError,
    TransportUnavailable,
    nccl_lib,
    wire,
)
from mmtransfer.device import DeviceInfo
from mmtransfer.sender_table import InFlight
from mmtransfer.transports.negotiate import natural_transport, negotiate
from mmtransfer.transports.streams import host_stream

HIDDEN = 24
HOST = mcuda.host_id()
GPU_A = DeviceInfo("cuda", "GPU-aaaa", HOST)
GPU_B = DeviceInfo("cuda", "GPU-bbbb", HOST)
CPU = DeviceInfo("cpu", "", HOST)


# ---- negotiation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sender, receiver, expected",
    [
        (CPU, CPU, "shm"),
        (CPU, DeviceInfo("cpu", "", "otherhost/1"), "host"),
        (CPU, DeviceInfo("cpu", "", ""), "host"),
        (GPU_A, CPU, "host"),
        (CPU, GPU_A, "host"),
        (GPU_A, GPU_A, "cuda_ipc"),
        (GPU_A, GPU_B, "nccl"),
        (GPU_A, DeviceInfo("cuda", "GPU-aaaa", "otherhost/1"), "nccl"),
    ],
)
def test_auto_picks_the_natural_transport(sender, receiver, expected):
    assert natural_transport(sender, receiver) == expected
    assert negotiate("auto", "auto", sender, receiver) == expected


@pytest.mark.parametrize(
    "s_pref, r_pref, sender, receiver, expected",
    [
        ("host", "auto", GPU_A, GPU_B, "host"),
        ("auto", "host", GPU_A, GPU_A, "host"),
        ("nccl", "auto", GPU_A, GPU_B, "nccl"),
        ("auto", "cuda_ipc", GPU_A, GPU_A, "cuda_ipc"),
        ("nccl", "nccl", GPU_A, GPU_B, "nccl"),
        ("host", "auto", CPU, CPU, "host"),
        ("auto", "host", CPU, CPU, "host"),
        ("shm", "auto", CPU, CPU, "shm"),
        ("auto", "shm", CPU, CPU, "shm"),
    ],
)
def test_forced_transport_is_used_when_possible(s_pref, r_pref, sender, receiver, expected):
    assert negotiate(s_pref, r_pref, sender, receiver) == expected


@pytest.mark.parametrize(
    "s_pref, r_pref, sender, receiver, message",
    [
        ("auto", "nccl", GPU_A, GPU_A, "Duplicate GPU|two ranks on one GPU"),
        ("auto", "nccl", CPU, GPU_A, "both pools on CUDA"),
        ("auto", "cuda_ipc", GPU_A, GPU_B, "same GPU"),
        ("host", "nccl", GPU_A, GPU_B, "sender forces"),
        ("auto", "shm", CPU, DeviceInfo("cpu", "", "otherhost/1"), "shm needs both pools on the same host"),
        ("shm", "auto", CPU, DeviceInfo("cpu", "", ""), "same host"),
        ("auto", "shm", GPU_A, CPU, "shm needs both pools on the CPU"),
        ("auto", "shm", CPU, GPU_A, "both pools on the CPU"),
        ("shm", "host", CPU, CPU, "sender forces"),
    ],
)
def test_impossible_transport_is_a_clear_error(s_pref, r_pref, sender, receiver, message):
    with pytest.raises(TransportUnavailable, match=message):
        negotiate(s_pref, r_pref, sender, receiver)


def test_transport_is_a_config_field_with_env_override():
    assert TransferConfig().transport == "auto"
    assert TransferConfig.from_mapping({"transport": "nccl"}, env={}).transport == "nccl"
    assert TransferConfig.from_mapping({"transport": "nccl"}, env={"MM_TRANSPORT": "cuda_ipc"}).transport == "cuda_ipc"
    with pytest.raises(ValueError, match="transport"):
        TransferConfig(transport="rdma")
    with pytest.raises(ValueError, match="gpu_landing"):
        TransferConfig(gpu_landing="somewhere")


# ---- protocol additions ------------------------------------------------------------------------------
TID = "0123456789abcdef0123456789abcdef"
IPC = {
    "handle": "ab" * 64,
    "size_bytes": 4096,
    "offset_bytes": 0,
    "ref_counter_handle": "cd" * 8,
    "ref_counter_offset": 0,
    "event_handle": "",
    "event_sync_required": False,
    "storage_offset": 0,
    "rows": 16,
    "hidden": 64,
    "dtype": "bfloat16",
    "pid": 12,
    "local_key": "k",
}


@pytest.mark.parametrize(
    "msg",
    [
        wire.Bootstrap(TID, "auto", "cuda", "GPU-1", "h/b", 42),
        wire.BootstrapAck(TID, "nccl", "cuda", "GPU-2", "h/b", nccl_id="0f" * 128),
        wire.BootstrapAck(TID, "cuda_ipc", "cuda", "GPU-2", "h/b", ipc=IPC),
        wire.BootstrapAck(TID, "host", "cpu", "", "h/b"),
        wire.Close(TID, "broken"),
        wire.Pull(TID, 1, 64, 32, "nccl", "r", channel=TID, count=3, runs=(16, 16), op_seq=7),
        wire.Chunk(TID, 1, 64, 32, 200, None, pieces=((5, 16), (40, 16))),
    ],
    ids=lambda m: type(m).__name__,
)
def test_new_messages_round_trip(msg):
    assert wire.decode(wire.encode(msg)) == msg


def test_defaults_stay_off_the_wire():
    frame = wire.encode(wire.Pull(TID, 0, 0, 8, "host", ""))
    assert b"channel" not in frame and b"runs" not in frame and b"count" not in frame
    assert b"pieces" not in wire.encode(wire.Chunk(TID, 0, 0, 8, 8, None))


@pytest.mark.parametrize(
    "msg, field",
    [
        (wire.Bootstrap(TID, "auto", "gpu", "GPU-1", "h", 1), "device_kind"),
        (wire.Bootstrap(TID, "rdma", "cuda", "GPU-1", "h", 1), "transport"),
        (wire.BootstrapAck(TID, "nccl", "cuda", "G", "h", nccl_id="0f" * 10), "nccl_id"),
        (wire.BootstrapAck(TID, "cuda_ipc", "cuda", "G", "h", ipc={**IPC, "rows": 0}), "ipc.rows"),
        (wire.BootstrapAck(TID, "cuda_ipc", "cuda", "G", "h", ipc={**IPC, "extra": 1}), "ipc"),
        (wire.Pull(TID, 0, 0, 8, "nccl", "", channel=TID, runs=(0,)), "runs"),
        (wire.Pull(TID, 0, 0, 8, "nccl", "", channel=TID, count=-1), "count"),
        (wire.Chunk(TID, 0, 0, 8, 8, None, pieces=((1, 0),)), "pieces"),
    ],
)
def test_bad_new_fields_are_rejected(msg, field):
    frame = wire.encode(msg)  # encoding validates nothing; decoding must refuse the frame
    with pytest.raises(ProtocolError, match=field.split(".")[0]):
        wire.decode(frame)


def test_too_many_runs_are_refused():
    frame = wire.encode(wire.Pull(TID, 0, 0, 8, "nccl", "", channel=TID, runs=tuple([1] * 8)))
    too_many = frame.replace(b'"runs":[1,1,1,1,1,1,1,1]', b'"runs":[' + b",".join([b"1"] * 2049) + b"]")
    with pytest.raises(ProtocolError, match="runs"):
        wire.decode(too_many)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=12),
    st.lists(st.integers(1, 40), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
def test_pieces_are_contiguous_on_both_sides_and_cover_the_chunk(src_lens, dst_lens, rnd):
    total = min(sum(src_lens), sum(dst_lens))
    # sender runs at random pool rows, trimmed to `total` tokens
    src, token = [], 0
    for n in src_lens:
        take = min(n, total - token)
        if take <= 0:
            break
        src.append((rnd.randrange(0, 10_000), take))
        token += take
    pieces = wire.split_pieces(src, dst_lens)
    assert sum(n for _, n in pieces) == total
    wire.check_pieces(tuple(pieces), total, dst_lens)  # no piece crosses a receiver run
    # every piece lies inside one sender run
    starts, t = [], 0
    for row, n in src:
        starts.append((t, row, n))
        t += n
    t = 0
    for row, n in pieces:
        run = next(s for s in starts if s[0] <= t < s[0] + s[2])
        assert t + n <= run[0] + run[2] and row == run[1] + (t - run[0])
        t += n
    cuts = {sum(src_lens[: i + 1]) for i in range(len(src_lens))} | {
        sum(dst_lens[: i + 1]) for i in range(len(dst_lens))
    }
    assert len(pieces) == len({c for c in cuts if c < total}) + 1


def test_piece_crossing_a_receiver_boundary_is_refused():
    with pytest.raises(ProtocolError, match="crosses"):
        wire.check_pieces(((0, 10),), 10, (4, 6))
    with pytest.raises(ProtocolError, match="cover"):
        wire.check_pieces(((0, 4),), 10, ())


# ---- an in-process stand-in for libnccl ------------------------------------------------------------
class _World:
    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.lock = threading.Lock()
        self.sends: dict[tuple[int, int], deque] = {}
        self.recvs: dict[tuple[int, int], deque] = {}
        self.errors: list[str] = []
        self.moved = 0
        self.posted: dict[tuple[int, int], deque] = {}  # receives posted before their send
        self.waiting: dict = {}  # receiver comm -> receives still posted


class _Comm:
    def __init__(self, world: _World, rank: int):
        self.world, self.rank, self.aborted = world, rank, False

    def __hash__(self):
        return id(self)


class FakeNccl:
    """Pairs the i-th send from rank a to rank b with the i-th receive at b from a, as NCCL does."""

    def __init__(self):
        self.worlds: dict[bytes, _World] = {}
        self.lock = threading.Lock()
        self.groups = 0

    def version_string(self):
        return "fake"

    def get_unique_id(self):
        uid = nccl_lib.ncclUniqueId()
        ctypes.memmove(ctypes.addressof(uid), os.urandom(128), 128)
        return uid

    def comm_init_rank(self, nranks, uid, rank):
        key = bytes(uid.internal)
        with self.lock:
            world = self.worlds.setdefault(key, _World())
        world.barrier.wait(timeout=20)
        return _Comm(world, rank)

    def send(self, ptr, nbytes, peer, comm, stream):
        """Never waits (a GPU send waits on its stream, not on the host); completes a receive posted
        before it, if there is one."""
        w = comm.world
        if comm.aborted:
            raise nccl_lib.NcclError("communicator aborted", code=5)
        with w.lock:
            waiting = w.posted.setdefault((comm.rank, peer), deque())
            if waiting:
                rptr, rbytes, rcomm, box = waiting.popleft()
                w.waiting[rcomm] -= 1
                self._move(w, rptr, rbytes, ctypes.string_at(ptr, nbytes), nbytes)
                box[0] = True
            else:
                # snapshot the bytes: here the "stream" completes at once, so the caller may reuse them
                w.sends.setdefault((comm.rank, peer), deque()).append((ctypes.string_at(ptr, nbytes), nbytes))

    def recv(self, ptr, nbytes, peer, comm, stream):
        """Completes at once when its matching send was posted already; else it stays posted (as a
        stream-ordered receive on a GPU does) and the send completes it. A receive that is still posted
        on a communicator nobody aborted at the end is an error: on a GPU it would hang."""
        w = comm.world
        if comm.aborted:
            raise nccl_lib.NcclError("communicator aborted", code=5)
        with w.lock:
            q = w.sends.setdefault((peer, comm.rank), deque())
            if q:
                src, n = q.popleft()
                self._move(w, ptr, nbytes, src, n)
            else:
                box = [False]  # the receive's completion, as the stream's stand-in sees it
                w.posted.setdefault((peer, comm.rank), deque()).append((ptr, nbytes, comm, box))
                w.waiting[comm] = w.waiting.get(comm, 0) + 1
                on = host_stream(stream)
                if on is not None:
                    on.defer(lambda: box[0] or comm.aborted)

    @staticmethod
    def _move(w, ptr, nbytes, src, n):
        if n != nbytes:
            w.errors.append(f"size mismatch: recv {nbytes} vs send {n}")
            return
        ctypes.memmove(ptr, src, nbytes)
        w.moved += nbytes

    def group_start(self):
        self.groups += 1

    def group_end(self):
        pass

    def comm_abort(self, comm):
        comm.aborted = True

    def comm_destroy(self, comm):
        comm.aborted = True

    def errors(self):
        hung = [
            f"{n} receive(s) posted with no matching send (a hang on a GPU)"
            for w in self.worlds.values()
            for comm, n in w.waiting.items()
            if n and not comm.aborted
        ]
        return [e for w in self.worlds.values() for e in w.errors] + hung


@pytest.fixture
def fake_nccl(monkeypatch):
    fake = FakeNccl()
    monkeypatch.setattr(nccl_lib, "load", lambda: fake)
    return fake


def _cfg(**kw) -> TransferConfig:
    base = dict(
        block_tokens=8,
        default_window_tokens=32,
        pool_blocks=64,
        max_embed_tokens=4096,
        pull_timeout_s=10,
        alloc_timeout_s=2,
        bootstrap_timeout_s=20,
    )
    base.update(kw)
    return TransferConfig(**base)


class _Pair:
    def __init__(
        self, monkeypatch, transport: str, sender_dev: DeviceInfo, receiver_dev: DeviceInfo, dtype=torch.bfloat16, **kw
    ):
        cfg = _cfg(transport=transport, **kw)
        self.sender_pool = BlockPool(512, cfg.block_tokens, HIDDEN, dtype, name="s")
        self.receiver_pool = BlockPool(cfg.pool_blocks, cfg.block_tokens, HIDDEN, dtype, name="r")
        self.sender = SenderEndpoint(self.sender_pool, cfg.replace(transport="auto"), name="s")
        self.sender.server.device_info = sender_dev
        monkeypatch.setattr(mcuda, "device_info", lambda device: receiver_dev)
        # the pools are on the CPU here; let the receiver negotiate as if its pool were on a GPU
        monkeypatch.setattr(Receiver, "uses_channels", property(lambda self: True))
        self.receiver = Receiver(self.receiver_pool, cfg, name="r")
        self.cfg = cfg

    def close(self):
        self.receiver.close()
        self.sender.close()


@pytest.fixture
def nccl_pair(monkeypatch, fake_nccl, request):
    landing = getattr(request, "param", "direct")
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_B, gpu_landing=landing)
    yield pair
    pair.close()
    assert fake_nccl.errors() == []


@pytest.fixture(params=["direct", "window"])
def ipc_pair(monkeypatch, request):
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A, gpu_landing=request.param)
    yield pair
    pair.close()


def _fragment(pool: BlockPool, seed: int) -> list[list[int]]:
    """Hold every other small allocation so later allocations are not contiguous."""
    rnd = random.Random(seed)
    held, keep = [], []
    for _ in range(pool.total_blocks // 4):
        ids = pool.alloc(rnd.choice([1, 2]))
        if ids is None:
            break
        held.append(ids)
    for i, ids in enumerate(held):
        if i % 2:
            pool.free(ids)
        else:
            keep.append(ids)
    return keep


def _eventually(cond, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _data(tokens: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, HIDDEN, generator=g).to(dtype)


@pytest.mark.parametrize("nccl_pair", ["direct", "window"], indirect=True)
@pytest.mark.parametrize("tokens", [1, 32, 33, 64, 65, 100, 32 * 17 + 5])
def test_nccl_channel_bit_exact_with_continuations(nccl_pair, fake_nccl, tokens):
    _fragment(nccl_pair.sender_pool, tokens)
    _fragment(nccl_pair.receiver_pool, tokens + 1)
    data = _data(tokens, tokens)
    got = nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    assert torch.equal(got.embedding.view(torch.int16), data.view(torch.int16))
    assert got.record.transport == "nccl"
    assert got.record.chunks == -(-tokens // 32) and got.record.ready_s > 0
    assert nccl_pair.sender.active_transfers == 0


def test_nccl_continuations_ride_on_one_pull(nccl_pair, monkeypatch):
    seen: list[wire.Pull] = []
    real = nccl_pair.sender.server.serve

    def spy(identity, pull, entry):
        seen.append(pull)
        return real(identity, pull, entry)

    monkeypatch.setattr(nccl_pair.sender.server, "serve", spy)
    data = _data(32 * 5 + 3, 1)
    got = nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    assert torch.equal(got.embedding, data) and got.record.continuations == 5
    # one PULL for everything (count=0): the five continuations cost no round trip
    assert [(p.seq, p.sent_tokens, p.count) for p in seen] == [(0, 0, 0)]
    assert got.timings and got.timings["sent"] <= got.timings["first_chunk"] <= got.timings["ready"]


def test_nccl_channel_is_formed_once_and_warmed_up(nccl_pair, fake_nccl):
    for i in range(3):
        data = _data(40, i)
        assert torch.equal(nccl_pair.receiver.pull(nccl_pair.sender.register(data)).embedding, data)
    assert len(fake_nccl.worlds) == 1
    assert len(nccl_pair.sender.channels.links) == 1


def test_nccl_concurrent_receivers_keep_the_pairing_order(nccl_pair, fake_nccl):
    datas = [_data(n, n) for n in (5, 31, 64, 65, 120, 7, 200, 33, 96, 1, 150, 64)]
    refs = [nccl_pair.sender.register(d) for d in datas]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            results[i] = nccl_pair.receiver.pull(refs[i]).embedding
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(refs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and fake_nccl.errors() == []
    assert all(torch.equal(results[i], d) for i, d in enumerate(datas))
    assert nccl_pair.receiver_pool.used_blocks == 0


def test_nccl_out_of_order_pull_is_refused_then_channel_reopens(nccl_pair, fake_nccl):
    data = _data(70, 3)
    assert torch.equal(nccl_pair.receiver.pull(nccl_pair.sender.register(data)).embedding, data)
    channel = nccl_pair.receiver.link_for(nccl_pair.sender.address)
    channel.ops += 1  # as if a receive had been posted that the sender never matched
    ref = nccl_pair.sender.register(data)
    with pytest.raises(RemoteError, match="out of order"):
        nccl_pair.receiver.pull(ref)
    assert channel.broken
    assert _eventually(lambda: nccl_pair.sender.active_transfers == 0)  # aborted, freed
    assert torch.equal(nccl_pair.receiver.pull(nccl_pair.sender.register(data)).embedding, data)
    assert len(fake_nccl.worlds) == 2  # a new communicator


def test_nccl_unknown_transfer_keeps_the_channel(nccl_pair):
    data = _data(10, 4)
    nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    channel = nccl_pair.receiver.link_for(nccl_pair.sender.address)
    bogus = nccl_pair.sender.register(data)
    nccl_pair.sender.discard(bogus.transfer_id)
    with pytest.raises(TransferError, match="unknown transfer id"):
        nccl_pair.receiver.pull(bogus)
    assert not channel.broken
    assert torch.equal(nccl_pair.receiver.pull(nccl_pair.sender.register(data)).embedding, data)
    assert nccl_pair.receiver.link_for(nccl_pair.sender.address) is channel


def test_ipc_channel_bit_exact_and_frees(ipc_pair):
    _fragment(ipc_pair.sender_pool, 5)
    _fragment(ipc_pair.receiver_pool, 6)
    for tokens in (1, 32, 33, 300):
        data = _data(tokens, tokens)
        got = ipc_pair.receiver.pull(ipc_pair.sender.register(data))
        assert torch.equal(got.embedding.view(torch.int16), data.view(torch.int16))
        assert got.record.transport == "cuda_ipc" and got.record.chunks == -(-tokens // 32)
    # a same-GPU pull returns at its CLAIM's ACK; its DONE (unanswered) frees the sender's blocks just after
    assert _eventually(lambda: ipc_pair.sender.active_transfers == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ipc_other_dtypes(monkeypatch, dtype):
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_A, dtype=dtype)
    try:
        data = _data(77, 9, dtype)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
    finally:
        pair.close()


def test_sender_without_gpu_gives_host(monkeypatch):
    pair = _Pair(monkeypatch, "auto", CPU, GPU_B)
    try:
        data = _data(50, 2)
        got = pair.receiver.pull(pair.sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "host"
        assert pair.receiver.link_for(pair.sender.address) is pair.receiver.links.host_link  # remembered: once
    finally:
        pair.close()


def test_forced_gpu_transport_on_cpu_pools_is_a_clear_error_and_frees():
    cfg = _cfg(transport="nccl")
    sender = SenderEndpoint(BlockPool(64, 8, HIDDEN, name="s"), cfg.replace(transport="auto"), name="s")
    receiver = Receiver(BlockPool(16, 8, HIDDEN, name="r"), cfg, name="r")
    try:
        ref = sender.register(torch.randn(20, HIDDEN))
        with pytest.raises(TransportUnavailable, match="nccl needs both pools on CUDA"):
            receiver.pull(ref)
        deadline = time.monotonic() + 2
        while sender.active_transfers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.active_transfers == 0 and sender.pool.used_blocks == 0
        assert receiver.pool.used_blocks == 0
    finally:
        receiver.close()
        sender.close()


def test_cpu_receiver_forced_to_host_never_bootstraps(monkeypatch):
    """transport=host on a CPU receiver: no BOOTSTRAP, host frames only (on auto it asks for shm:
    test_transport_shm.py)."""
    cfg = _cfg(transport="host")
    sender = SenderEndpoint(BlockPool(64, 8, HIDDEN, name="s"), cfg, name="s")
    receiver = Receiver(BlockPool(16, 8, HIDDEN, name="r"), cfg, name="r")
    called = []
    monkeypatch.setattr(sender.server, "on_bootstrap", lambda *a: called.append(a))
    try:
        data = torch.randn(70, HIDDEN)
        got = receiver.pull(sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.transport == "host" and not called
    finally:
        receiver.close()
        sender.close()


# ---- the sender does not free blocks under an in-flight send ------------------------------------
class _Event:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done


def test_blocks_are_freed_only_after_inflight_sends_complete():
    cfg = _cfg()
    pool = BlockPool(64, 8, HIDDEN, name="s")
    sender = SenderEndpoint(pool, cfg, name="s")
    try:
        ref = sender.register(torch.randn(40, HIDDEN))
        used = pool.used_blocks
        assert used == 5
        event = _Event()
        sender.table.entries[ref.transfer_id].in_flight = InFlight(event, "")
        sender.discard(ref.transfer_id, "test")
        time.sleep(0.2)
        assert pool.used_blocks == used  # deferred: the send may still read them
        event.done = True
        deadline = time.monotonic() + 2
        while pool.used_blocks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.used_blocks == 0
    finally:
        sender.close()


def test_channel_unknown_to_the_sender_is_reopened_once(nccl_pair, fake_nccl):
    """A sender that lost the channel (restart, or it gave it up) answers the first PULL with
    ERROR(unknown_channel) and posts nothing: the receiver opens a new channel and the pull succeeds."""
    data = _data(90, 8)
    assert torch.equal(nccl_pair.receiver.pull(nccl_pair.sender.register(data)).embedding, data)
    old = nccl_pair.receiver.link_for(nccl_pair.sender.address)
    nccl_pair.sender.channels.close(old.link_id, "test: forget it")
    got = nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    assert torch.equal(got.embedding, data) and got.record.transport == "nccl"
    assert old.broken and nccl_pair.receiver.link_for(nccl_pair.sender.address) is not old
    assert len(fake_nccl.worlds) == 2


def test_sender_serves_explicit_counts_too(nccl_pair):
    """The wire allows PULL(count=k) from any offset: k chunks, each its own CHUNK, in order."""
    import zmq

    data = _data(32 * 4, 12)
    ref = nccl_pair.sender.register(data)
    channel = nccl_pair.receiver.link_for(nccl_pair.sender.address)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(nccl_pair.sender.address)
    try:
        pull = wire.Pull(ref.transfer_id, 0, 32, 32, "nccl", "", channel=channel.link_id, count=9, op_seq=channel.ops)
        sock.send(wire.encode(pull))
        assert sock.poll(2000)
        reply = wire.decode(sock.recv_multipart()[0])
        assert isinstance(reply, wire.Error) and "do not fit" in reply.message  # only 3 chunks are left
    finally:
        sock.close(linger=0)
        nccl_pair.sender.discard(ref.transfer_id)


def test_a_pull_on_an_unknown_channel_is_answered_with_its_own_code(nccl_pair):
    """The receiver reopens a channel on ERROR(unknown_channel), a typed code, never on message text."""
    import zmq

    ref = nccl_pair.sender.register(_data(8, 14))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(nccl_pair.sender.address)
    try:
        sock.send(wire.encode(wire.Pull(ref.transfer_id, 0, 0, 32, "nccl", "", channel=TID, count=0)))
        assert sock.poll(2000)
        reply = wire.decode(sock.recv_multipart()[0])
        assert isinstance(reply, wire.Error) and reply.code is wire.ErrorCode.UNKNOWN_CHANNEL
    finally:
        sock.close(linger=0)
        nccl_pair.sender.discard(ref.transfer_id)


def test_sockets_are_reused_between_pulls(nccl_pair):
    data = _data(40, 13)
    nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    idle = list(nccl_pair.receiver.sockets.idle[nccl_pair.sender.address])
    assert len(idle) == 1
    nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    assert nccl_pair.receiver.sockets.idle[nccl_pair.sender.address] == idle


# ---- an NCCL communicator that times out is aborted and recreated ---------------------------------
def test_nccl_landing_timeout_aborts_the_communicator_and_the_next_pull_recreates_it(nccl_pair, fake_nccl, monkeypatch):
    """On a GPU, bytes that never land (a peer that hangs, a wedged communicator) show as a CUDA event that
    never completes. The receiver waits for it at most pull_timeout_s, drains (bounded), aborts the
    communicator on its side (ncclCommAbort), tells the sender (CLOSE: it aborts its side) and ABORTs the
    transfer (the sender frees the blocks); the next pull bootstraps a new communicator and works."""
    import mmtransfer.receiver_pull as receiver_mod
    from mmtransfer import ChannelError

    data = _data(90, 21)
    assert torch.equal(nccl_pair.receiver.pull(nccl_pair.sender.register(data)).embedding, data)
    old = nccl_pair.receiver.link_for(nccl_pair.sender.address)
    old_sender = nccl_pair.sender.channels.links[old.link_id]
    old_comms = (old.comm, old_sender.comm)
    waits: list[float] = []

    def never_lands(event, timeout_s, blocking=False):  # the stream's event stays incomplete until the timeout
        waits.append(timeout_s)
        return False

    monkeypatch.setattr(receiver_mod, "wait_event", never_lands)
    monkeypatch.setattr(type(old), "drain", lambda self, timeout_s: False)
    ref = nccl_pair.sender.register(data)
    with pytest.raises(ChannelError, match="not landed within"):
        nccl_pair.receiver.pull(ref)
    assert waits == [nccl_pair.cfg.pull_timeout_s]  # bounded by the configured timeout, nothing else
    assert old.broken and old_comms[0].aborted  # ncclCommAbort on the receiver's side
    assert _eventually(lambda: old_comms[1].aborted)  # CLOSE -> the sender aborted its side
    assert _eventually(lambda: nccl_pair.sender.active_transfers == 0)  # ABORT -> blocks freed
    assert nccl_pair.receiver_pool.used_blocks == 0
    monkeypatch.undo()
    monkeypatch.setattr(nccl_lib, "load", lambda: fake_nccl)
    monkeypatch.setattr(mcuda, "device_info", lambda device: GPU_B)
    monkeypatch.setattr(Receiver, "uses_channels", property(lambda self: True))
    got = nccl_pair.receiver.pull(nccl_pair.sender.register(data))
    assert torch.equal(got.embedding, data) and got.record.transport == "nccl"
    new = nccl_pair.receiver.link_for(nccl_pair.sender.address)
    assert new is not old and not new.broken and len(fake_nccl.worlds) == 2  # a fresh communicator


def test_sender_aborts_a_channel_whose_sends_never_complete(monkeypatch, fake_nccl):
    """The sender's half of the same guarantee: blocks whose sends do not complete within pull_timeout_s
    (the receiver vanished mid-transfer) are freed after the channel's communicator was aborted."""
    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_B, pull_timeout_s=0.5)
    try:
        data = _data(40, 22)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
        channel_id = next(iter(pair.sender.channels.links))
        sender_channel = pair.sender.channels.links[channel_id]
        ref = pair.sender.register(data)
        used = pair.sender_pool.used_blocks
        stuck = _Event()  # an event that never completes
        pair.sender.table.entries[ref.transfer_id].in_flight = InFlight(stuck, channel_id)
        pair.sender.discard(ref.transfer_id, "receiver vanished")
        time.sleep(0.2)
        assert pair.sender_pool.used_blocks == used  # still deferred: the sends may read the blocks
        assert _eventually(lambda: pair.sender_pool.used_blocks == 0, 3.0)
        assert sender_channel.comm is None and channel_id not in pair.sender.channels.links  # aborted, forgotten
        # the receiver's next pull finds the channel unknown, reopens it once, and works
        got = pair.receiver.pull(pair.sender.register(data))
        assert torch.equal(got.embedding, data) and len(fake_nccl.worlds) == 2
    finally:
        pair.close()


# ---- the control endpoint restarted at the same address ----------------------------------------------
def _restart_sender(pair: _Pair) -> SenderEndpoint:
    port = pair.sender.port
    device = pair.sender.server.device_info
    pair.sender.close()
    fresh = SenderEndpoint(pair.sender_pool, pair.cfg.replace(transport="auto", control_port=port), name="s2")
    fresh.server.device_info = device
    pair.sender = fresh
    return fresh


@pytest.mark.parametrize("transport_case", ["nccl", "host"])
def test_receiver_recovers_when_the_sender_endpoint_restarts_at_the_same_port(monkeypatch, fake_nccl, transport_case):
    """Cached sockets and channels of the receiver point at an endpoint that went away and came back (a
    restarted encoder with a fixed control_port): an embedding of the old endpoint fails clearly and in
    bounded time, and new ones are served: no hang, no stale channel reused."""
    sender_dev = GPU_A if transport_case == "nccl" else CPU
    pair = _Pair(monkeypatch, "auto", sender_dev, GPU_B, pull_timeout_s=2)
    try:
        data = _data(70, 23)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
        lost = pair.sender.register(data)  # published by the old endpoint; dies with it
        old_address = pair.sender.address
        _restart_sender(pair)
        assert pair.sender.address == old_address
        start = time.monotonic()
        with pytest.raises(TransferError, match="unknown transfer id"):
            pair.receiver.pull(lost)
        assert time.monotonic() - start < pair.cfg.pull_timeout_s + 1
        for seed in range(3):
            fresh = _data(50 + seed, seed)
            got = pair.receiver.pull(pair.sender.register(fresh))
            assert torch.equal(got.embedding, fresh)
        assert pair.receiver_pool.used_blocks == 0
        assert _eventually(lambda: pair.sender.active_transfers == 0)
    finally:
        pair.close()


def test_pull_in_flight_when_the_endpoint_dies_fails_in_bounded_time(monkeypatch, fake_nccl):
    """The endpoint closes while a pull waits for its answer (here: for an embedding not written yet):
    the pull fails within pull_timeout_s, everything is freed, and the restarted endpoint serves."""
    pair = _Pair(monkeypatch, "auto", CPU, GPU_B, pull_timeout_s=1.0, pull_wait_s=5.0)
    try:
        ref = pair.sender.reserve("never-filled")
        errors: list[BaseException] = []

        def pull():
            try:
                pair.receiver.pull(ref)
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        t = threading.Thread(target=pull)
        start = time.monotonic()
        t.start()
        time.sleep(0.3)
        _restart_sender(pair)
        t.join(10)
        assert not t.is_alive() and time.monotonic() - start < 5
        assert errors and isinstance(errors[0], TransferError)
        assert pair.receiver_pool.used_blocks == 0
        data = _data(40, 24)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
    finally:
        pair.close()


# ---- channels of receivers that went away -----------------------------------------------------------
def test_receiver_close_tells_the_sender_and_idle_channels_are_reaped(monkeypatch, fake_nccl):
    """A receiver that closes sends CLOSE (the sender aborts its side now); one that vanished without a word
    (killed) leaves a channel that the sender closes after CHANNEL_IDLE_S without use, and when MAX_CHANNELS
    are open the least recently used idle one makes room. A receiver whose channel was reaped reopens it."""
    import mmtransfer.sender_channels as sender_mod

    pair = _Pair(monkeypatch, "auto", GPU_A, GPU_B)
    try:
        data = _data(40, 31)
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
        assert len(pair.sender.channels.links) == 1
        pair.receiver.close()
        assert _eventually(lambda: not pair.sender.channels.links)  # CLOSE on close
        pair.receiver = Receiver(pair.receiver_pool, pair.cfg, name="r2")
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)
        (channel,) = pair.sender.channels.links.values()
        monkeypatch.setattr(sender_mod, "CHANNEL_IDLE_S", 0.2)
        assert _eventually(lambda: not pair.sender.channels.links, 5.0)  # reaped: nobody used it
        assert _eventually(lambda: channel.comm is None)  # closed by the server thread just after
        assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)  # reopened once
        monkeypatch.setattr(sender_mod, "CHANNEL_IDLE_S", 900.0)
        monkeypatch.setattr(sender_mod, "MAX_CHANNELS", 1)
        first = next(iter(pair.sender.channels.links))
        other = Receiver(BlockPool(16, 8, HIDDEN, torch.bfloat16, name="r3"), pair.cfg, name="r3")
        try:
            assert torch.equal(other.pull(pair.sender.register(data)).embedding, data)  # evicts the LRU one
            assert first not in pair.sender.channels.links and len(pair.sender.channels.links) == 1
            assert torch.equal(pair.receiver.pull(pair.sender.register(data)).embedding, data)  # and back
        finally:
            other.close()
    finally:
        pair.close()


# ---- one link interface ------------------------------------------------------------------------------
def test_the_registry_covers_every_transport_and_the_base_imports_no_implementation():
    import ast
    from pathlib import Path

    from mmtransfer import Transport
    from mmtransfer.transports import RECEIVER_LINKS, SENDER_LINKS, base

    kinds = set(Transport) - {Transport.AUTO}
    assert set(SENDER_LINKS) == kinds == set(RECEIVER_LINKS)
    for kind in kinds:
        assert SENDER_LINKS[kind].kind is kind and RECEIVER_LINKS[kind].kind is kind
        assert issubclass(SENDER_LINKS[kind], base.SenderLink) and issubclass(RECEIVER_LINKS[kind], base.ReceiverLink)
    tree = ast.parse(Path(base.__file__).read_text())
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"host", "nccl", "cuda_ipc", "nccl_lib"}, imported
