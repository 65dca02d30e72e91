"""The GPU data path for real: a sender process with its pool on GPU 0, receivers in this process on
GPU 1 (NCCL) and on GPU 0 (CUDA IPC). Bit-exact reassembly for bf16 and fp16, continuations of 1, 2
and many chunks, both landing modes, fragmented pools on both sides, concurrency, clear errors.

Protocol 3: a registered embedding's EMBED_REF names its pool rows: on the same GPU the receiver CLAIMs
them and copies from the mapped pool at once (no PULL: no ``sent`` phase), the sender ACKing only its own
transfer's rows, then sends DONE; over NCCL the first window's receives are posted right after the PULL. Refs without
rows (``reserve`` + ``fill``) still take the PULL path. On one GPU the NCCL cases skip themselves.

Skipped without CUDA (tests/conftest.py); the NCCL cases skip with fewer than two GPUs."""

from __future__ import annotations

import os
import random
import threading

import pytest
import torch

from mmtransfer import (
    BlockPool,
    EmbedRef,
    ProtocolError,
    Receiver,
    RemoteError,
    TransferConfig,
    TransferError,
    TransportUnavailable,
    dtype_from_name,
)
from mmtransfer.ref import new_transfer_id

from ._procs import SenderProcess, embedding_for

pytestmark = pytest.mark.gpu
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

HIDDEN = 1024
WINDOW = 1024
# tokens -> chunks at the default 1024-token window: 1, 2, 3 and many (21)
LENGTHS = {"one": 700, "exact": 1024, "two": 1500, "three": 2500, "many": 20 * 1024 + 17}


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _config(**kw) -> TransferConfig:
    base = dict(
        block_tokens=128,
        default_window_tokens=WINDOW,
        pool_blocks=64,
        max_embed_tokens=32768,
        use_size_hint=False,
        pull_timeout_s=60,
        bootstrap_timeout_s=120,
    )
    base.update(kw)
    return TransferConfig(**base)


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def sender(request):
    proc = SenderProcess(_config(), blocks=512, hidden=HIDDEN, dtype_name=request.param, device="cuda:0")
    proc.dtype = request.param
    proc.call("fragment", 11)  # the sender's blocks are not contiguous
    yield proc
    proc.call("unfragment")
    assert proc.stop() == 0, "sender process leaked blocks"


def _receiver(transport: str, dtype: str, landing: str, blocks: int = 64, fragment: bool = True, **kw) -> Receiver:
    device = "cuda:1" if transport == "nccl" else "cuda:0"
    pool = BlockPool(blocks, 128, HIDDEN, dtype_from_name(dtype), device, name=f"rx-{transport}-{landing}")
    # fragment the receiver pool too: windows are not contiguous, so pieces split at the union
    rnd, grabbed = random.Random(5), []
    for _ in range(blocks // 4 if fragment else 0):
        ids = pool.alloc(rnd.choice([1, 2]))
        if ids is None:
            break
        grabbed.append(ids)
    keep = [ids for i, ids in enumerate(grabbed) if i % 2 == 0]
    for i, ids in enumerate(grabbed):
        if i % 2:
            pool.free(ids)
    rx = Receiver(pool, _config(transport=transport, gpu_landing=landing, **kw), name=f"rx-{transport}")
    rx._held_for_test = keep
    return rx


def _close(rx: Receiver) -> None:
    for ids in rx._held_for_test:
        rx.pool.free(ids)
    assert rx.pool.used_blocks == 0, "receiver leaked blocks"
    rx.close()


def _need(transport: str) -> None:
    if transport == "nccl" and _gpus() < 2:
        pytest.skip("NCCL between two GPUs needs 2 GPUs")


@pytest.fixture(scope="module")
def receivers():
    made: dict[tuple, Receiver] = {}

    def get(transport, dtype, landing):
        key = (transport, dtype, landing)
        if key not in made:
            made[key] = _receiver(transport, dtype, landing)
        return made[key]

    yield get
    for rx in made.values():
        _close(rx)


@pytest.mark.parametrize("landing", ["direct", "window"])
@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_bit_exact_reassembly(sender, receivers, transport, landing, name):
    _need(transport)
    tokens = LENGTHS[name]
    rx = receivers(transport, sender.dtype, landing)
    ref = EmbedRef.from_json(sender.call("register", tokens, tokens))
    got = rx.pull(ref, request_id=f"{transport}-{name}")
    assert got.embedding.device == rx.pool.device
    expected = embedding_for(tokens, tokens, HIDDEN, dtype_from_name(sender.dtype))
    assert torch.equal(got.embedding.cpu().view(torch.int16), expected.view(torch.int16)), "bytes differ"
    chunks = -(-tokens // WINDOW)
    if transport == "cuda_ipc" and ref.ready:  # copied at once from the mapped pool: no PULL was sent
        assert "sent" not in got.timings and "acked" in got.timings
    assert got.record.transport == transport
    assert got.record.chunks == chunks and got.record.continuations == chunks - 1
    assert got.aux.extras == {"grid_thw": [1, 2, tokens]}
    assert sender.call("used") == 0, "sender did not free after DONE"


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_concurrent_pulls_on_one_channel(sender, receivers, transport):
    _need(transport)
    rx = receivers(transport, sender.dtype, "direct")
    lengths = [5, 1024, 1500, 3000, 64, 9000, 2049, 700, 4096, 333, 12000, 1]
    refs = [EmbedRef.from_json(sender.call("register", 100 + i, n)) for i, n in enumerate(lengths)]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = rx.pull(refs[i]).embedding.cpu()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(refs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, n in enumerate(lengths):
        expected = embedding_for(100 + i, n, HIDDEN, dtype_from_name(sender.dtype))
        assert torch.equal(results[i].view(torch.int16), expected.view(torch.int16)), f"pull {i} ({n} tokens)"
    assert sender.call("used") == 0


def test_exact_size_window_moves_everything_in_one_chunk(sender):
    transport = "nccl" if _gpus() >= 2 else "cuda_ipc"
    rx = _receiver(transport, sender.dtype, "direct", blocks=256, fragment=False, default_window_tokens=32768)
    try:
        tokens = 20 * 1024 + 17
        got = rx.pull(EmbedRef.from_json(sender.call("register", 9, tokens)))
        expected = embedding_for(9, tokens, HIDDEN, dtype_from_name(sender.dtype))
        assert torch.equal(got.embedding.cpu().view(torch.int16), expected.view(torch.int16))
        assert got.record.chunks == 1
    finally:
        _close(rx)


def test_nccl_on_the_same_gpu_is_refused_clearly(sender):
    pool = BlockPool(16, 128, HIDDEN, dtype_from_name(sender.dtype), "cuda:0", name="rx-same")
    rx = Receiver(pool, _config(transport="nccl"))
    try:
        ref = EmbedRef.from_json(sender.call("register", 3, 100))
        with pytest.raises(TransportUnavailable, match="one GPU"):
            rx.pull(ref)
        assert sender.call("used") == 0  # the embedding was aborted, not left to its TTL
        assert pool.used_blocks == 0
    finally:
        rx.close()


def test_pool_lives_on_the_instance_gpu(sender):
    rx = _receiver("cuda_ipc", sender.dtype, "direct")
    try:
        assert rx.pool.storage.device == torch.device("cuda:0")
    finally:
        _close(rx)


def _expected(sender, seed: int, tokens: int) -> torch.Tensor:
    return embedding_for(seed, tokens, HIDDEN, dtype_from_name(sender.dtype)).view(torch.int16)


@pytest.mark.parametrize("landing", ["direct", "window"])
def test_same_gpu_ready_ref_is_copied_at_once_with_no_pull(sender, receivers, landing):
    rx = receivers("cuda_ipc", sender.dtype, landing)
    rx.pull(EmbedRef.from_json(sender.call("register", 1, 10)))  # the channel exists: the pool is mapped
    for seed, tokens in ((21, 700), (22, 2500)):  # one chunk; three chunks at the 1024-token window
        ref = EmbedRef.from_json(sender.call("register", seed, tokens))
        assert ref.ready and sum(n for _, n in ref.rows) == tokens  # 6 and 20 blocks: their runs fit the ref
        got = rx.pull(ref)
        assert torch.equal(got.embedding.cpu().view(torch.int16), _expected(sender, seed, tokens))
        assert "sent" not in got.timings and {"first_chunk", "ready", "acked"} <= set(got.timings)
        assert got.record.chunks == -(-tokens // WINDOW) and got.aux.extras == {"grid_thw": [1, 2, tokens]}
    assert sender.call("used") == 0


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_ref_without_rows_takes_the_pull_path(sender, receivers, transport):
    _need(transport)
    rx = receivers(transport, sender.dtype, "window")
    ref = EmbedRef.from_json(sender.call("reserve_fill", 31, 1500))
    assert not ref.ready
    got = rx.pull(ref)
    assert torch.equal(got.embedding.cpu().view(torch.int16), _expected(sender, 31, 1500))
    assert "sent" in got.timings and got.record.chunks == 2
    assert sender.call("used") == 0


def test_same_gpu_forged_rows_get_nothing(sender, receivers):
    """Rows of another transfer: the sender does not ACK the CLAIM, the pull fails; rows outside the mapped pool:
    refused before anything is read. The failed pulls ABORT what they named: everything is freed."""
    rx = receivers("cuda_ipc", sender.dtype, "direct")
    victim = EmbedRef.from_json(sender.call("register", 41, 256))
    mine = EmbedRef.from_json(sender.call("register", 42, 256))
    with pytest.raises(RemoteError, match="not this transfer's blocks"):
        rx.pull(EmbedRef(mine.transfer_id, mine.address, 256, rows=victim.rows, aux=mine.aux))
    with pytest.raises(ProtocolError, match="outside the sender's pool"):
        rx.pull(EmbedRef(victim.transfer_id, victim.address, 256, rows=((1 << 30, 256),), aux=victim.aux))
    with pytest.raises(TransferError, match="unknown transfer id"):
        rx.pull(EmbedRef(new_transfer_id(), mine.address, 256, rows=mine.rows, aux=mine.aux))
    assert sender.call("used") == 0
    ref = EmbedRef.from_json(sender.call("register", 43, 300))
    assert torch.equal(rx.pull(ref).embedding.cpu().view(torch.int16), _expected(sender, 43, 300))


def test_nccl_refused_early_pull_keeps_the_channel(sender, receivers):
    """Receives posted early for a PULL the sender refuses are paired with zeros: the channel stays usable."""
    _need("nccl")
    rx = receivers("nccl", sender.dtype, "direct")
    ref = EmbedRef.from_json(sender.call("register", 51, 900))
    assert torch.equal(rx.pull(ref).embedding.cpu().view(torch.int16), _expected(sender, 51, 900))
    channel = rx.link_for(ref.address)
    ref = EmbedRef.from_json(sender.call("register", 52, 900))
    with pytest.raises(TransferError, match="unknown transfer id"):
        rx.pull(EmbedRef(new_transfer_id(), ref.address, 900, rows=ref.rows, aux=ref.aux))
    assert rx.link_for(ref.address) is channel and not channel.broken
    assert torch.equal(rx.pull(ref).embedding.cpu().view(torch.int16), _expected(sender, 52, 900))
    assert sender.call("used") == 0
