"""Batched vision encoding: the batch policy (token budget, delay, no overtaking), the batcher thread's
life cycle, the tower's batched output equal to each image alone (fp32, CPU), and the encoder service
batching concurrent requests with every block freed on every path."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest
import torch

from mm_encoder.batcher import EncodeBatcher, EncodeJob, PreparedImage, take_batch
from mmtransfer import TransferCancelled


class _Countdown:
    """Set once ``n`` answers came (answers run one after another on the batcher thread: never block it)."""

    def __init__(self, n):
        self.n, self.lock, self.event = n, threading.Lock(), threading.Event()

    def hit(self):
        with self.lock:
            self.n -= 1
            if self.n == 0:
                self.event.set()

    def wait(self, timeout):
        assert self.event.wait(timeout), "not every request was answered"


def _job(tokens, rid="r", done=None):
    return EncodeJob(rid, [PreparedImage(None, "", t) for t in tokens], lambda: False, done or (lambda refs, err: None))


def test_take_batch_fills_the_budget_in_order_and_never_splits_a_job():
    q = deque([_job([300], "a"), _job([500, 200], "b"), _job([100], "c"), _job([50], "d")])
    assert [j.request_id for j in take_batch(q, 1000)] == ["a", "b"]  # c would fit, but may not overtake
    assert [j.request_id for j in take_batch(q, 1000)] == ["c", "d"]
    q = deque([_job([5000], "big"), _job([1], "small")])
    assert [j.request_id for j in take_batch(q, 1000)] == ["big"]  # larger than the budget: alone


class _Recorder:
    def __init__(self, delay_s=0.0):
        self.batches, self.delay_s = [], delay_s

    def __call__(self, jobs):
        self.batches.append([j.request_id for j in jobs])
        time.sleep(self.delay_s)
        for j in jobs:
            j.finish([j.request_id], None)


def test_jobs_arriving_within_the_delay_share_a_batch():
    rec = _Recorder()
    batcher = EncodeBatcher(rec, max_batch_tokens=10_000, max_delay_s=0.2)
    try:
        done = _Countdown(3)
        results = []

        def answer(refs, err):
            results.append((refs, err))
            done.hit()

        for i in range(3):
            batcher.submit(_job([100], f"j{i}", answer))
        done.wait(5)
    finally:
        batcher.close()
    assert rec.batches == [["j0", "j1", "j2"]]
    assert sorted(r for r, _ in results) == [["j0"], ["j1"], ["j2"]]


def test_a_full_budget_goes_without_waiting_and_a_lone_job_waits_at_most_the_delay():
    rec = _Recorder()
    batcher = EncodeBatcher(rec, max_batch_tokens=200, max_delay_s=0.5)
    try:
        ev = threading.Event()
        start = time.perf_counter()
        batcher.submit(_job([100, 100], "full", lambda r, e: ev.set()))
        assert ev.wait(5)
        assert time.perf_counter() - start < 0.4  # the budget was full: no delay
        ev.clear()
        start = time.perf_counter()
        batcher.submit(_job([10], "lone", lambda r, e: ev.set()))
        assert ev.wait(5)
        assert 0.45 <= time.perf_counter() - start < 2.0
    finally:
        batcher.close()
    assert rec.batches == [["full"], ["lone"]]


def test_close_fails_queued_jobs_and_refuses_new_ones():
    gate = threading.Event()
    batcher = EncodeBatcher(
        lambda jobs: (gate.wait(5), [j.finish([], None) for j in jobs]),
        max_batch_tokens=1,
        max_delay_s=0.0,
        closed_error=lambda: TransferCancelled("closing"),
    )
    answers = {}
    batcher.submit(_job([1], "running", lambda r, e: answers.setdefault("running", (r, e))))
    time.sleep(0.1)
    batcher.submit(_job([1], "queued", lambda r, e: answers.setdefault("queued", (r, e))))
    threading.Timer(0.2, gate.set).start()
    batcher.close()
    assert answers["running"] == ([], None)
    assert isinstance(answers["queued"][1], TransferCancelled)
    with pytest.raises(TransferCancelled):
        batcher.submit(_job([1], "late"))


def test_a_raising_batch_fails_its_jobs_and_the_batcher_keeps_serving():
    calls = []

    def run(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("bug")
        for j in jobs:
            j.finish(["ok"], None)

    batcher = EncodeBatcher(run, max_delay_s=0.0)
    try:
        got = []
        ev = threading.Event()
        batcher.submit(_job([1], "a", lambda r, e: (got.append(e), ev.set())))
        assert ev.wait(5) and isinstance(got[0], RuntimeError)
        ev.clear()
        batcher.submit(_job([1], "b", lambda r, e: (got.append(r), ev.set())))
        assert ev.wait(5) and got[1] == ["ok"]
    finally:
        batcher.close()


@pytest.mark.parametrize("bad", [{"max_batch_tokens": 0}, {"max_delay_s": -0.001}, {"max_delay_s": 2.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        EncodeBatcher(lambda jobs: None, **bad)


# ---- the real tower (tiny model, fp32, CPU) -------------------------------------------------------------
SIZES = [(56, 56), (112, 84), (28, 140), (224, 224)]


def test_batched_tower_output_equals_each_image_alone_bit_exact(encoder):
    from ._engine_util import random_image

    images = [random_image(i, w, h) for i, (w, h) in enumerate(SIZES)]
    alone = [encoder.encode(im) for im in images]
    batched = encoder.encode_batch([encoder.preprocess(im) for im in images])
    assert [b.grid_thw for b in batched] == [a.grid_thw for a in alone]
    for a, b in zip(alone, batched):
        assert a.embeds.dtype == torch.float32
        diff = (a.embeds - b.embeds).abs().max().item()
        assert torch.equal(a.embeds, b.embeds), f"max abs difference {diff}"


@pytest.fixture
def service(tiny_model_dir):
    from mm_encoder.service import EncoderService
    from mmtransfer import TransferConfig

    svc = EncoderService(
        tiny_model_dir,
        TransferConfig(pool_blocks=256),
        name="t-batch",
        cache_blocks=64,
        max_encode_batch_tokens=100_000,
        max_encode_delay_ms=300,
    )
    yield svc
    svc.close()
    assert svc.pool.used_blocks == 0


def _pull_all(service, refs):
    from mmtransfer import BlockPool, Receiver, TransferConfig

    cfg = TransferConfig(pool_blocks=256)
    rx_pool = BlockPool(256, cfg.block_tokens, service.vision.hidden_size, service.vision.dtype, name="t-rx")
    with Receiver(rx_pool, cfg) as rx:
        out = []
        for ref in refs:
            received = rx.pull(ref, "t")
            out.append(received.embedding.clone())
            rx_pool.free(received.blocks) if hasattr(received, "blocks") else None
        return out


def test_concurrent_requests_share_one_tower_call_and_equal_their_solo_embeddings(service, tiny_model_dir):
    import io

    from PIL import Image

    from mm_bench.images import make_test_image

    datas = [make_test_image(tokens=t, seed=10 + i, model_dir=tiny_model_dir) for i, t in enumerate((64, 256, 120))]
    calls = []
    real = service.vision.encode_batch
    service.vision.encode_batch = lambda inputs: (calls.append(len(inputs)), real(inputs))[1]
    results, errors = {}, []
    done = _Countdown(len(datas))

    def answer(i):
        def cb(refs, err, clock):
            results[i] = (refs, clock)
            errors.append(err)
            done.hit()

        return cb

    for i, data in enumerate(datas):  # the second request repeats nothing: three misses, one call
        service.submit([data], answer(i), f"c{i}")
    done.wait(30)
    assert errors == [None] * 3 and calls == [3]
    embeds = _pull_all(service, [results[i][0][0] for i in range(3)])
    for data, got in zip(datas, embeds):
        alone = service.vision.encode(Image.open(io.BytesIO(data)).convert("RGB"))
        assert torch.equal(alone.embeds, got)
    clock = results[0][1].seconds
    assert {p.value for p in clock} >= {"queue", "image_decode", "preprocess", "vision", "publish"}
    assert clock[next(p for p in clock if p.value == "queue")] >= 0.0


def test_a_cancelled_request_in_a_batch_fails_alone_and_frees_its_blocks(service, tiny_model_dir):
    from mm_bench.images import make_test_image

    datas = [make_test_image(tokens=64, seed=30 + i, model_dir=tiny_model_dir) for i in range(2)]
    flag = {"cancel": False}
    out = {}
    done = _Countdown(2)

    def cb(name):
        def answer(refs, err, clock):
            out[name] = (refs, err)
            done.hit()

        return answer

    service.submit([datas[0]], cb("kept"), "kept")
    service.submit([datas[1], datas[0]], cb("cancelled"), "cancelled", lambda: flag["cancel"])
    flag["cancel"] = True
    done.wait(30)
    assert out["kept"][1] is None and len(out["kept"][0]) == 1
    assert isinstance(out["cancelled"][1], TransferCancelled) and out["cancelled"][0] is None
    for ref in out["kept"][0]:
        service.sender.discard(ref.transfer_id)
    service.cache.clear()
    assert service.pool.used_blocks == 0 and service.sender.active_transfers == 0


def test_cache_hits_skip_the_tower_and_release_on_every_path(service, tiny_model_dir):
    from mm_bench.images import make_test_image

    data = make_test_image(tokens=64, seed=40, model_dir=tiny_model_dir)
    first = service.encode([data], "first")
    calls = []
    real = service.vision.encode_batch
    service.vision.encode_batch = lambda inputs: (calls.append(len(inputs)), real(inputs))[1]
    again = service.encode([data, data], "again")
    assert calls == [] and service.cache.hits >= 2  # both images from the cache, no tower call
    for ref in first + again:
        service.sender.discard(ref.transfer_id)
    # a publish failure after a hit: the hit's reference is released
    service.sender.publish = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("publish failed"))
    with pytest.raises(RuntimeError, match="publish failed"):
        service.encode([data], "broken")
    assert service.cache.idle_blocks == service.cache.cached_blocks  # nobody holds a reference
    service.cache.clear()
    assert service.pool.used_blocks == 0


# ---- the Triton model's two ways of answering (a stand-in for pb_utils) -------------------------------------
def _encoder_model(service, batching):
    from types import SimpleNamespace

    import numpy as np

    from mm_encoder.triton_model import EncoderModel
    from tests.unit.test_triton_engine_glue import _Request, pb

    model = EncoderModel()
    model.pb_utils, model.service, model.instance_name, model.batching = pb, service, "enc_0", batching
    failures, observed, images = [], [], []
    model.metrics = SimpleNamespace(transfer_failed=failures.append)
    model.phases = SimpleNamespace(observe=lambda rid, seconds: observed.append((rid, dict(seconds))))
    model._images = SimpleNamespace(increment=images.append)

    def request(datas):
        return _Request({"IMAGE": np.array(datas, dtype=np.object_)})

    return model, request, observed


@pytest.mark.parametrize("batching", [True, False])
def test_encoder_model_answers_once_per_request(service, tiny_model_dir, batching):
    from mm_bench.images import make_test_image
    from mmtransfer import EmbedRef

    model, request, observed = _encoder_model(service, batching)
    good, bad = request([make_test_image(tokens=64, seed=50, model_dir=tiny_model_dir)]), request([b"not an image"])
    returned = model.execute([good, bad])
    if batching:
        assert returned is None
        _wait_for(lambda: good.sender.sent and bad.sender.sent)
        (ok, f1), (err, f2) = good.sender.sent[0], bad.sender.sent[0]
        assert f1 == f2 == 1 and len(good.sender.sent) == len(bad.sender.sent) == 1  # one FINAL answer each
    else:
        ok, err = returned
        assert good.sender.sent == [] and bad.sender.sent == []  # answered by execute() itself
    assert err.error.code == "INVALID_ARG" and "IMAGE[0]" in err.error.message
    (ref,) = [EmbedRef.from_json(bytes(x)) for x in ok.outputs["EMBED_REF"]]
    assert ref.num_tokens == 64
    assert [rid for rid, _ in observed] == ["rid"]  # phases of the answered request only
    service.sender.discard(ref.transfer_id)
    service.cache.clear()
    assert service.pool.used_blocks == 0


def _wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "not answered in time"
        time.sleep(0.01)
