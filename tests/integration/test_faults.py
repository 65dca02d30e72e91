"""Faults and backpressure through a real tritonserver: pool exhaustion, killed and stopped stubs, cancelled
and vanished clients, pulls that time out. One server for the module, with small pools, short timeouts, the
shared secret on, and the stub watchdog (Triton 2.51 does not restart a dead stub; see
backends/mm_triton/watchdog.py). After every test: no stub died that was not meant to, every pool is whole
(mm_pool_blocks_used == 0 on every instance) and the pipeline answers correctly again.

Knobs (env): pools of 24 blocks x 128 tokens (an encoder holds two 1200-token images at a time), window
128 tokens (10 chunks per such image), alloc_timeout_s 2, pull_timeout_s 2, pull_wait_s 1, ttl_s 4.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import free_port
from internal import with_token
from mm_bench.images import make_test_image
from mmtransfer import EmbedRef
from mmtransfer.ref import new_transfer_id
from reliability import ReliableServer, error_text, pipeline_inputs, tensors

pytestmark = pytest.mark.integration

TTL_S, PULL_TIMEOUT_S, ALLOC_TIMEOUT_S = 4.0, 2.0, 2.0
ENV = {
    "MM_POOL_BLOCKS": "24",
    "MM_MAX_EMBED_TOKENS": "3072",
    "MM_CACHE_BLOCKS": "12",
    "MM_DEFAULT_WINDOW_TOKENS": "128",
    "MM_TTL_S": str(TTL_S),
    "MM_PULL_TIMEOUT_S": str(PULL_TIMEOUT_S),
    "MM_PULL_WAIT_S": "1",
    "MM_ALLOC_TIMEOUT_S": str(ALLOC_TIMEOUT_S),
    "MM_SHARED_SECRET": secrets.token_hex(16),
    "MM_TRUSTED_ENCODERS": "127.0.0.2:*",  # the dead and silent endpoints below (mm_language refuses strangers)
    "MM_MAX_TOKENS_LIMIT": "4096",  # long generations to give up in
    "MM_PASS_CANCELLATION": "1",  # a cancel during generation is passed on (off by default)
    # test-only: while this file exists, the models it names hang in execute() (mm_triton.heartbeat)
    "MM_TEST_HANG_FILE": f"/tmp/mm-test-hang-{os.getpid()}",
}
BIG = 1200  # tokens: 10 blocks of 128, 10 chunks through a 128-token window
BIG_BLOCKS = 10
PROMPT = b"Describe the image."
# what a request hit by a fault may answer (anything else is a bug)
FAULT_ERRORS = re.compile(
    r"is not healthy|unavailable \((timeout|not_found|expired|pool_exhausted|channel|stub_died|model_reloading)\)|"
    r"cancelled|"
    r"[Uu]nknown model|not ready|unavailable|Socket closed|failed to connect|Deadline|Connection reset|"
    r"Broken pipe|EOF"
)


@pytest.fixture(scope="module")
def rs(request):
    from conftest import LOG_DIR

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    server = ReliableServer(env=ENV, log_file=LOG_DIR / "test_faults-server.log")
    with server:
        server.start_pids = server.stubs()
        yield server


@pytest.fixture(scope="module")
def rs_unbatched(request):
    """The same server with the encoder answering from execute() (max_encode_batch_tokens 0: no batching)."""
    from conftest import LOG_DIR

    server = ReliableServer(
        env={**ENV, "MM_MAX_ENCODE_BATCH_TOKENS": "0"}, log_file=LOG_DIR / "test_faults-unbatched-server.log"
    )
    with server:
        server.start_pids = server.stubs()
        yield server


@pytest.fixture(scope="module")
def images():
    return {seed: make_test_image(tokens=BIG, seed=seed) for seed in range(100, 112)}


@pytest.fixture(scope="module")
def small_image():
    return make_test_image(tokens=96, seed=7)


def _grpc(rs) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(rs.grpc_url)


def _pipeline(rs, images: list[bytes], max_tokens: int = 4, **kw) -> list[int]:
    result = _grpc(rs).infer("mm_pipeline", tensors(grpcclient, pipeline_inputs(images, PROMPT, max_tokens)), **kw)
    return result.as_numpy("TOKEN_IDS").tolist()


def _encode(rs, images: list[bytes]) -> list[bytes]:
    inputs = with_token(rs, "mm_encoder", {"IMAGE": np.array(images, dtype=np.object_)})  # white-box call
    result = _grpc(rs).infer("mm_encoder", tensors(grpcclient, inputs))
    return list(result.as_numpy("EMBED_REF"))


def _language(rs, refs: list[bytes], max_tokens: int = 2, client_timeout: float | None = None) -> list[int]:
    inputs = {
        "EMBED_REF": np.array(refs, dtype=np.object_),
        "PROMPT": np.array([PROMPT], dtype=np.object_),
        "MAX_TOKENS": np.array([max_tokens], dtype=np.int32),
    }
    inputs = with_token(rs, "mm_language", inputs)
    result = _grpc(rs).infer("mm_language", tensors(grpcclient, inputs), client_timeout=client_timeout)
    return result.as_numpy("TOKEN_IDS").tolist()


def _dead_ref(port: int | None = None) -> bytes:
    return EmbedRef(new_transfer_id(), f"tcp://127.0.0.2:{port or free_port('127.0.0.2')}", BIG).to_json().encode()


def _healthy(rs, small_image, expect_restarts: bool = False) -> None:
    """The end of every test: pools whole, no stub died unnoticed, the pipeline answers."""
    assert rs.wait_pools_empty(TTL_S + 6) == {}, "blocks still held"
    if not expect_restarts:
        assert rs.stubs() == rs.start_pids, "a stub died"
    assert len(_pipeline(rs, [small_image], 2)) == 2


# ---- 1. pool exhaustion --------------------------------------------------------------------------------
def test_far_more_concurrent_large_requests_than_the_pools_hold(rs, images, small_image):
    """24 concurrent requests of 1-2 images of 1200 tokens (10 blocks each) against pools of 24 blocks:
    every request completes with the same tokens as when run alone, or fails with a clear UNAVAILABLE naming
    pool exhaustion; nothing deadlocks (encoder pool full of published embeddings waiting for the single
    language instance, the cache reclaimer, the language window), memory stays bounded, pools end whole."""
    seeds = list(images)
    sets = [
        [images[seeds[0]]],
        [images[seeds[1]]],
        [images[seeds[2]], images[seeds[3]]],
        [images[seeds[0]]],
        [images[seeds[4]]],
        [images[seeds[1]], images[seeds[0]]],
    ]
    reference = [_pipeline(rs, s) for s in sets]  # one at a time first: the expected tokens
    rss_before = rs.rss_bytes()
    outcomes: list[tuple[str, str]] = []

    def one(i: int) -> tuple[str, str]:
        try:
            got = _pipeline(rs, sets[i % len(sets)], client_timeout=120)
            return ("ok", "") if got == reference[i % len(sets)] else ("wrong", f"{got} != {reference[i % len(sets)]}")
        except InferenceServerException as exc:
            return ("error", error_text(exc))

    start = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(24)))
    elapsed = time.monotonic() - start
    errors = [m for kind, m in outcomes if kind == "error"]
    assert not [m for kind, m in outcomes if kind == "wrong"], "a response differs from the one-at-a-time run"
    assert all(re.search(r"UNAVAILABLE.*(exhausted|expired)", m) for m in errors), errors
    assert sum(kind == "ok" for kind, _ in outcomes) >= len(outcomes) // 2
    assert elapsed < 150, f"24 requests took {elapsed:.0f}s"
    growth = rs.rss_bytes() - rss_before
    print(
        f"pool exhaustion: {len(outcomes) - len(errors)}/{len(outcomes)} served, {len(errors)} UNAVAILABLE, "
        f"{elapsed:.1f}s, RSS {rss_before >> 20} -> {(rss_before + growth) >> 20} MiB"
    )
    assert growth < 400 << 20, f"server + stubs grew by {growth >> 20} MiB"
    _healthy(rs, small_image)


def test_a_full_encoder_pool_fails_clearly_after_alloc_timeout(rs, images, small_image):
    """Two published embeddings nobody pulls (20 of 24 blocks): a third waits alloc_timeout_s, then UNAVAILABLE
    naming the exhausted pool; a request that could never fit is refused at once; the held ones are freed by
    their pull and by the TTL."""
    exhausted_before = rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="pool_exhausted")
    ttl_before = rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="ttl")
    held = [_encode(rs, [images[105]])[0], _encode(rs, [images[106]])[0]]
    assert rs.pools_used()["mm_encoder_0_0"] == 2 * BIG_BLOCKS
    start = time.monotonic()
    with pytest.raises(InferenceServerException, match=r"unavailable \(pool_exhausted\).*exhausted.*alloc_timeout_s"):
        _encode(rs, [images[107]])
    assert ALLOC_TIMEOUT_S - 0.1 <= time.monotonic() - start < ALLOC_TIMEOUT_S + 3
    start = time.monotonic()
    with pytest.raises(InferenceServerException, match="whole pool") as info:
        _encode(rs, [images[108], images[109], images[110]])  # 30 blocks > 24: never, so at once
    assert time.monotonic() - start < 1.5 and "INVALID_ARG" in str(info.value.status())
    assert len(_language(rs, [held[0]])) == 2  # pulled: freed now
    assert rs.wait_pools_empty(TTL_S + 3) == {}  # the other one: the TTL
    assert rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="pool_exhausted") == exhausted_before + 1
    assert rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="ttl") == ttl_before + 1
    _healthy(rs, small_image)


# ---- 2. pulls that time out ----------------------------------------------------------------------------
def test_pull_from_a_silent_or_closed_endpoint_times_out_in_bounded_time(rs, small_image):
    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen(8)  # accepts TCP, never speaks ZeroMQ
    try:
        for ref in (_dead_ref(listener.getsockname()[1]), _dead_ref()):
            start = time.monotonic()
            with pytest.raises(InferenceServerException, match=r"unavailable \(timeout\).*no answer.*2\.0s"):
                _language(rs, [ref])
            assert PULL_TIMEOUT_S - 0.1 <= time.monotonic() - start < PULL_TIMEOUT_S + 3
    finally:
        listener.close()
    _healthy(rs, small_image)


def test_pull_from_a_stopped_encoder_times_out_and_frees_both_sides(rs, images, small_image):
    """SIGSTOP the encoder's stub with an embedding published: the pull fails after pull_timeout_s; once the
    stub runs again it reads the PULL and the receiver's ABORT and frees its blocks (no TTL needed)."""
    ttl_before = rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="ttl")
    ref = _encode(rs, [images[101]])[0]
    grace, rs.watchdog.stop_grace_s = rs.watchdog.stop_grace_s, 60.0  # this test resumes the stub itself
    pid = rs.kill_stub("mm_encoder", signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(InferenceServerException, match=r"unavailable \(timeout\)"):
            _language(rs, [ref])
        assert time.monotonic() - start < PULL_TIMEOUT_S + 3
    finally:
        import os

        os.kill(pid, signal.SIGCONT)
        rs.watchdog.stop_grace_s = grace
    assert rs.wait_pools_empty(TTL_S - 1) == {}  # before the TTL could have done it
    assert rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="ttl") == ttl_before
    _healthy(rs, small_image)


# ---- 3. clients that cancel or vanish ------------------------------------------------------------------
def _busy_language(rs) -> threading.Thread:
    """Keep the (single) language instance busy for pull_timeout_s: a pull from a port nobody serves."""
    t = threading.Thread(target=lambda: pytest.raises(InferenceServerException, _language, rs, [_dead_ref()]))
    t.start()
    time.sleep(0.3)
    return t

    _healthy(rs, small_image)


@pytest.mark.parametrize("how", ["grpc_cancel_at_once", "grpc_cancel_queued"])
def test_clients_that_give_up_leave_nothing_behind(rs, images, small_image, how):
    """mm_pipeline requests cancelled by their clients before generation: during the encoder step (what was
    published is aborted or reclaimed), and while mm_language is busy pulling from a dead port. Whatever the
    server did, nothing leaks and it serves on."""
    busy = _busy_language(rs) if how != "grpc_cancel_at_once" else None
    client = _grpc(rs)
    inputs = pipeline_inputs([images[103]], PROMPT, 4)
    ctx = client.async_infer("mm_pipeline", tensors(grpcclient, inputs), callback=lambda *a: None)
    time.sleep(0.01 if how == "grpc_cancel_at_once" else 0.6)
    ctx.cancel()
    if busy is not None:
        busy.join(10)
    _healthy(rs, small_image)
    client.close()


LONG_TOKENS = 3800  # IGNORE_EOS: a generation long enough (seconds on a CPU) for its client to give up in it


def _engine_idle(rs, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(
        rs.metric(m, model="mm_language") for m in ("mm_engine_running_sequences", "mm_engine_waiting_sequences")
    ):
        assert time.monotonic() < deadline, "mm_language still generating"
        time.sleep(0.05)


def _give_up_during_generation(rs, inputs: dict, how: str) -> None:
    """Send ``inputs`` to mm_pipeline and give up once mm_language is generating for it."""
    if how == "http_disconnect":  # HTTP has no cancellation: the client's socket times out
        client = httpclient.InferenceServerClient(rs.http_address, network_timeout=1.5, connection_timeout=1.5)
        with pytest.raises(Exception, match="(?i)timed out|timeout"):
            client.infer("mm_pipeline", tensors(httpclient, inputs))
        client.close()
        return
    client = _grpc(rs)
    if how == "grpc_deadline":
        with pytest.raises(InferenceServerException, match="(?i)deadline"):
            client.infer("mm_pipeline", tensors(grpcclient, inputs), client_timeout=1.5)
    else:
        ctx = client.async_infer("mm_pipeline", tensors(grpcclient, inputs), callback=lambda *a: None)
        deadline = time.monotonic() + 30
        while not rs.metric("mm_engine_running_sequences", model="mm_language"):
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.02)
        time.sleep(0.3)
        ctx.cancel()
    client.close()


@pytest.mark.parametrize("how", ["grpc_cancel", "grpc_deadline", "http_disconnect"])
def test_a_client_that_gives_up_during_generation(rs, small_image, how):
    """A client that cancels or passes its gRPC deadline while mm_language generates for it: the pipeline posts
    the cancellation for its language step (a BLS call cannot be cancelled in Triton 2.51), the engine ends the
    sequence at its next step, and the slot and blocks are free within a second, not after the generation's
    full length. HTTP has no cancellation in Triton: the server generates to the end and drops the answer;
    nothing leaks either way."""
    inputs = {**pipeline_inputs([small_image], PROMPT, LONG_TOKENS), "IGNORE_EOS": np.array([True])}
    _engine_idle(rs)
    start = time.monotonic()
    result = _grpc(rs).infer("mm_pipeline", tensors(grpcclient, inputs), client_timeout=120)
    full_tokens, full_s = len(result.as_numpy("TOKEN_IDS")), time.monotonic() - start
    assert full_tokens == LONG_TOKENS and full_s > 3.0, f"premise: {full_tokens} tokens in {full_s:.1f}s"
    _engine_idle(rs)
    before = rs.metric("mm_engine_generated_tokens_total", model="mm_language")
    _give_up_during_generation(rs, inputs, how)
    gave_up = time.monotonic()
    _engine_idle(rs, timeout_s=full_s + 30)
    ended_after_s = time.monotonic() - gave_up
    generated = rs.metric("mm_engine_generated_tokens_total", model="mm_language") - before
    print(f"{how}: {generated:.0f} of {LONG_TOKENS} tokens ({full_s:.1f}s alone), idle after {ended_after_s:.2f}s")
    if how == "http_disconnect":
        assert generated <= LONG_TOKENS
    else:
        assert generated < LONG_TOKENS / 2 and ended_after_s < 2.0, (generated, ended_after_s)
    assert rs.wait_pools_empty(2.0) == {}
    _healthy(rs, small_image)


# ---- 4. stubs killed -------------------------------------------------------------------------------------
def _traffic(rs, images, stop: threading.Event, outcomes: list) -> None:
    seeds = list(images)
    i = 0
    while not stop.is_set():
        start = time.monotonic()
        try:
            _pipeline(rs, [images[seeds[i % len(seeds)]]], 2, client_timeout=60)
            outcomes.append(("ok", time.monotonic() - start, ""))
        except InferenceServerException as exc:
            outcomes.append(("error", time.monotonic() - start, error_text(exc)))
            time.sleep(0.05)  # the model may be reloading: do not spin
        i += 1


# Requests in flight in a killed stub that answers from its own threads (mm_language's engine, mm_encoder's
# batcher) are not failed by Triton 2.51: the pipeline's step monitor fails them (UNAVAILABLE (stub_died)).
# KNOWN RISK (issue 13): killing the batching encoder's stub made tritonserver itself abort in 2 of 4 runs
# (boost::interprocess::lock_exception at the reload; heap corruption at shutdown); scripts/serve restarts it.
# With max_encode_batch_tokens 0 (answers returned by execute()) the kill is handled as before: mm_encoder_unbatched.
@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            "mm_encoder",
            marks=pytest.mark.xfail(
                reason="a killed stub answering from a thread may take tritonserver 2.51 down with it (issue 13)",
                strict=False,
            ),
        ),
        "mm_encoder_unbatched",
        "mm_language",
    ],
)
def test_a_stub_killed_under_traffic(request, images, small_image, model):
    """SIGKILL a stub while requests stream through (transfers of 10 chunks in flight). Affected requests fail
    clearly and within pull_timeout_s (plus the reload); an embedding published for the killed language
    instance is reclaimed by the encoder's TTL; the watchdog reloads the model and the pipeline serves again."""
    rs = request.getfixturevalue("rs_unbatched" if model == "mm_encoder_unbatched" else "rs")
    model = model.replace("_unbatched", "")
    ttl_before = rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="ttl")
    orphan = _encode(rs, [images[111]])[0] if model == "mm_language" else None  # published, never to be pulled
    held_ref = _encode(rs, [images[110]])[0] if model == "mm_encoder" else None  # dies with the encoder
    stop, outcomes = threading.Event(), []
    workers = [threading.Thread(target=_traffic, args=(rs, images, stop, outcomes)) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    restarts_before = len(rs.watchdog.restarts)
    rs.kill_stub(model)
    if held_ref is not None:  # its sender is gone: the pull fails in bounded time, the window is freed
        start = time.monotonic()
        with pytest.raises(InferenceServerException, match=r"unavailable \(timeout\)|not healthy|not ready|unknown"):
            _language(rs, [held_ref])
        assert time.monotonic() - start < PULL_TIMEOUT_S + 8
    time.sleep(2)
    stop.set()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "a request hung"
    recovered = rs.wait_serving(120)
    assert [r.model for r in rs.watchdog.restarts[restarts_before:]] == [model]
    assert rs.watchdog.restarts[-1].ok
    errors = [(round(d, 1), m) for kind, d, m in outcomes if kind == "error"]
    assert all(FAULT_ERRORS.search(m) for _, m in errors), errors
    assert all(d < PULL_TIMEOUT_S + 15 for d, _ in errors), errors
    assert any(kind == "ok" for kind, _, _ in outcomes)
    if orphan is not None:
        assert rs.wait_pools_empty(TTL_S + 3) == {}
        assert rs.metric("mm_transfer_failures_total", model="mm_encoder", cause="ttl") >= ttl_before + 1
    rs.start_pids = rs.stubs()
    _healthy(rs, small_image, expect_restarts=True)
    print(
        f"{model} killed: {len(errors)} request(s) failed, reloaded in {rs.watchdog.restarts[-1].seconds:.1f}s, "
        f"serving again after {recovered:.1f}s"
    )


# ---- 5. stopped stubs and what a restart leaves behind ------------------------------------------------------
def test_a_stopped_stub_is_killed_and_restarted_before_triton_gives_up(rs, images, small_image):
    """SIGSTOP the encoder's stub under traffic and never resume it (a long swap stall, CPU throttling): the
    watchdog kills it after stop_grace_s and reloads the model; tritonserver stays up (before, 40 s of stop
    made it die of a boost::interprocess::lock_exception) and the pipeline serves again."""
    rs.watchdog.stop_grace_s = 2.0
    stop, outcomes = threading.Event(), []
    workers = [threading.Thread(target=_traffic, args=(rs, images, stop, outcomes)) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    restarts_before = len(rs.watchdog.restarts)
    stopped_at = time.monotonic()
    pid = rs.kill_stub("mm_encoder", signal.SIGSTOP)
    try:
        while len(rs.watchdog.restarts) == restarts_before and time.monotonic() - stopped_at < 60:
            time.sleep(0.1)
        recovered = rs.wait_serving(120)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    serving_after = time.monotonic() - stopped_at
    assert rs.server.is_running(), "tritonserver died"
    assert [r.model for r in rs.watchdog.restarts[restarts_before:]] == ["mm_encoder"]
    errors = [m for kind, _, m in outcomes if kind == "error"]
    assert all(FAULT_ERRORS.search(m) for m in errors), errors
    rs.start_pids = rs.stubs()
    _healthy(rs, small_image, expect_restarts=True)
    print(
        f"encoder stub stopped: killed after {rs.watchdog.stop_grace_s:.0f}s, reloaded in "
        f"{rs.watchdog.restarts[-1].seconds:.1f}s, serving again {serving_after:.1f}s after the stop "
        f"(+{recovered:.1f}s settle); {len(errors)} request(s) failed"
    )


@pytest.mark.parametrize(
    "model, hang",
    [("mm_encoder", "mm_encoder"), ("mm_encoder", "{instance}/batch"), ("mm_language", "mm_language/engine")],
)
def test_a_hung_stub_is_detected_by_its_heartbeat_and_restarted(rs, small_image, model, hang):
    """A stub that hangs without being stopped (a deadlock: state S, not T) answers nothing and Triton waits
    forever. The test-only knob makes mm_encoder's execute() hang, or its batcher's tower call, or mm_language's
    engine loop (those two are outside any execute(), which has returned); the watchdog sees the stub busy in
    one activity for longer than hang_s (its heartbeat), kills it and reloads the model, and the pipeline
    serves again."""
    from mm_triton import heartbeat, procfs

    flag = Path(ENV["MM_TEST_HANG_FILE"])
    rs.watchdog.hang_s = 3.0
    restarts_before = len(rs.watchdog.restarts)
    pid = rs.stub_pid(model)
    outcome: list[str] = []

    def request() -> None:
        try:
            _pipeline(rs, [small_image], 2, client_timeout=120)
            outcome.append("ok")
        except InferenceServerException as exc:
            outcome.append(error_text(exc))

    instance = next(inst for inst, stub in rs.stubs().items() if stub == pid)
    flag.write_text(hang.format(instance=instance))
    client = threading.Thread(target=request)
    try:
        client.start()
        deadline = time.monotonic() + 30
        while not heartbeat.busy_since(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        hung_at = time.monotonic()
        assert heartbeat.busy_since(pid), f"{model} never marked its heartbeat busy"
        assert procfs.proc_stat(pid).state not in ("T", "t")  # hung, not stopped
        while len(rs.watchdog.restarts) == restarts_before and time.monotonic() - hung_at < 90:
            time.sleep(0.1)
        restarted_after = time.monotonic() - hung_at
    finally:
        flag.unlink(missing_ok=True)
        rs.watchdog.hang_s = 120.0
        client.join(150)
    assert [r.model for r in rs.watchdog.restarts[restarts_before:]] == [model]
    assert procfs.proc_stat(pid) is None or not procfs.proc_stat(pid).alive
    assert not heartbeat.path_for(pid).exists()  # the dead stub's heartbeat file is removed too
    assert outcome and (outcome[0] == "ok" or FAULT_ERRORS.search(outcome[0])), outcome
    recovered = rs.wait_serving(120)
    rs.start_pids = rs.stubs()
    _healthy(rs, small_image, expect_restarts=True)
    print(
        f"hung {hang}: stub killed and reloaded {restarted_after:.1f}s after it hung (hang_s 3, reload "
        f"{rs.watchdog.restarts[-1].seconds:.1f}s, +{recovered:.1f}s settle); the hung request got {outcome[0][:80]!r}"
    )


def test_stub_kills_leave_no_shm_residue(rs, small_image):
    """Each SIGKILL of a stub used to leave its /dev/shm region (1 MiB and up) behind; the watchdog removes
    it once the model is reloaded. MM_SHM_KILLS (default 3) kills, alternating the two internal models."""
    from mm_triton.watchdog import list_stubs

    kills = int(os.environ.get("MM_SHM_KILLS", "3"))
    dead_regions = []
    freed_before = rs.watchdog.shm_freed_bytes
    for i in range(kills):
        model = ("mm_encoder", "mm_language")[i % 2]
        stub = next(s for s in list_stubs(rs.server.pid).values() if s.model == model)
        assert stub.shm_region and Path("/dev/shm", stub.shm_region).exists()
        dead_regions.append(stub.shm_region)
        rs.kill_stub(model)
        rs.wait_serving(120)
    left = [r for r in dead_regions if Path("/dev/shm", r).exists()]
    assert left == [], f"{len(left)} of {kills} dead stubs' regions left in /dev/shm"
    live = {s.shm_region for s in list_stubs(rs.server.pid).values()}
    assert all(Path("/dev/shm", r).exists() for r in live)  # the live stubs' regions are untouched
    rs.start_pids = rs.stubs()
    _healthy(rs, small_image, expect_restarts=True)
    print(
        f"{kills} stub kills: {len(dead_regions)} dead regions, 0 left, "
        f"{(rs.watchdog.shm_freed_bytes - freed_before) / 2**20:.1f} MiB removed from /dev/shm"
    )
