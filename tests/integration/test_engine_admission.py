"""Bounded queues, deadlines and cancellation of the language engine through a real tritonserver.

One server for the module, sized small so the bounds are reached with a handful of requests: one running
sequence (max_num_seqs=1), two admitted waiting (max_queue_size=2), at most 0.5 s waiting for a slot
(max_queue_delay_s). Every refusal is UNAVAILABLE naming its cause; every ended sequence frees its KV slot
and its pool blocks (mm_engine_kv_slots_used and mm_pool_blocks_used back to 0)."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from harness import DEFAULT_MODEL_REPOSITORY, TritonServer, metric_value
from internal import internal_token
from mm_bench.images import make_test_image
from mm_client import MMClient, ServerBusy

pytestmark = pytest.mark.integration
LONG = 1024  # max tokens: ~2 s of decoding for the tiny model on 2 CPU cores


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("admission") / "server.log"
    env = {
        "MM_CHECKPOINT": str(tiny_model_dir),
        "MM_MAX_NUM_SEQS": "1",
        "MM_MAX_QUEUE_SIZE": "2",
        "MM_MAX_QUEUE_DELAY_S": "0.5",
    }
    # the pipelines are BLS models: Triton does not know what they call, so their steps are listed too
    args = ["--model-control-mode=explicit"] + [
        f"--load-model={m}"
        for m in ("mm_encoder", "mm_language", "mm_language_stream", "mm_pipeline", "mm_pipeline_stream")
    ]
    with TritonServer(DEFAULT_MODEL_REPOSITORY, env=env, args=args, log_file=log, startup_timeout_s=300) as s:
        yield s


@pytest.fixture(scope="module")
def image(tiny_model_dir):
    return make_test_image(tokens=1500, seed=31, model_dir=tiny_model_dir)  # one continuation


def _outcome(server, outcome: str, model: str = "mm_language") -> float:
    return metric_value(server.metrics(), "mm_engine_requests_total", 0.0, model=model, outcome=outcome)


def _wait_idle(server, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        held = sum(
            v
            for (name, _), v in m.items()
            if name in ("mm_pool_blocks_used", "mm_engine_kv_slots_used", "mm_engine_waiting_sequences")
        )
        if held == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def _assert_idle(server) -> None:
    m = _wait_idle(server)
    for name in (
        "mm_pool_blocks_used",
        "mm_engine_kv_slots_used",
        "mm_engine_running_sequences",
        "mm_engine_waiting_sequences",
    ):
        assert sum(v for (n, _), v in m.items() if n == name) == 0, name


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_queue_full_and_queue_timeout_are_unavailable_naming_the_cause(server, image):
    """7 long requests at once: one runs, two wait (and give up after max_queue_delay_s), the rest are
    refused at once (queue_full); nothing is held afterwards."""

    def one(i: int) -> str:
        time.sleep(0.03 * i)
        with MMClient(server.grpc_url, protocol="grpc", timeout_s=120) as client:
            try:
                client.generate([image], "Describe the image.", max_tokens=LONG)
                return "ok"
            except ServerBusy as exc:
                return str(exc)

    t0 = time.monotonic()
    with ThreadPoolExecutor(7) as pool:
        outcomes = list(pool.map(one, range(7)))
    assert outcomes.count("ok") >= 1, outcomes  # the slot's holder (whichever reached the engine first)
    busy = [o for o in outcomes if o != "ok"]
    assert all("unavailable (queue_full)" in o or "unavailable (queue_timeout)" in o for o in busy), outcomes
    assert sum("queue_full" in o for o in busy) >= 2 and sum("queue_timeout" in o for o in busy) >= 1, outcomes
    assert time.monotonic() - t0 < 30
    _assert_idle(server)
    assert _outcome(server, "queue_full") >= 2 and _outcome(server, "queue_timeout") >= 1


@pytest.mark.parametrize("model", ["mm_pipeline", "mm_pipeline_stream"])
def test_deadline_ends_the_request_and_frees_everything(server, image, model):
    """TIMEOUT_MS bounds a request even through an ensemble (where client cancellation does not reach)."""
    before = _outcome(server, "deadline", model.replace("pipeline", "language"))
    t0 = time.monotonic()
    with MMClient(server.grpc_url, protocol="grpc", timeout_s=120) as client:
        with pytest.raises(ServerBusy, match=r"unavailable \(deadline\)"):
            if model == "mm_pipeline":
                client.generate([image], "Describe the image.", max_tokens=LONG, timeout_ms=300)
            else:
                list(client.stream([image], "Describe the image.", max_tokens=LONG, timeout_ms=300))
    assert time.monotonic() - t0 < 1.5  # left the batch at the next step, not after LONG tokens
    _assert_idle(server)
    assert _outcome(server, "deadline", model.replace("pipeline", "language")) == before + 1


def _embed_ref(server, image) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http_address, network_timeout=120)
    t = httpclient.InferInput("IMAGE", [1], "BYTES")
    t.set_data_from_numpy(np.array([image], dtype=np.object_))
    token = httpclient.InferInput("MM_INTERNAL_TOKEN", [1], "BYTES")  # white-box: internal models refuse clients
    token.set_data_from_numpy(np.array([internal_token(server).encode()], dtype=np.object_))
    return client.infer("mm_encoder", [t, token]).as_numpy("EMBED_REF")


def _grpc_inputs(refs: np.ndarray, max_tokens: int, server=None) -> list:
    arrays = [
        ("EMBED_REF", refs, "BYTES"),
        ("PROMPT", np.array([b"Describe the image."], dtype=np.object_), "BYTES"),
        ("MAX_TOKENS", np.array([max_tokens], dtype=np.int32), "INT32"),
    ]
    if server is not None:
        arrays.append(("MM_INTERNAL_TOKEN", np.array([internal_token(server).encode()], dtype=np.object_), "BYTES"))
    inputs = []
    for name, arr, dtype in arrays:
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def test_cancelling_a_direct_call_frees_the_slot_at_the_next_step(server, image):
    before = _outcome(server, "cancelled")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    ctx = client.async_infer(
        "mm_language",
        _grpc_inputs(_embed_ref(server, image), LONG, server),
        callback=lambda result, error: answers.put(error),
    )
    assert _wait_for(
        lambda: metric_value(server.metrics(), "mm_engine_running_sequences", 0.0, model="mm_language") == 1
    )
    t0 = time.monotonic()
    ctx.cancel()
    error = answers.get(timeout=30)
    assert error is not None and "CANCELLED" in str(error.status())
    assert _wait_for(lambda: _outcome(server, "cancelled") == before + 1, timeout_s=2.0)
    assert time.monotonic() - t0 < 2.0
    _assert_idle(server)
    client.close()


def test_closing_a_direct_stream_cancels_the_sequence(server, image):
    before = _outcome(server, "cancelled", "mm_language_stream")
    got = threading.Event()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got.set())
    client.async_stream_infer("mm_language_stream", _grpc_inputs(_embed_ref(server, image), LONG, server))
    assert got.wait(30)  # tokens are flowing
    client.stop_stream(cancel_requests=True)
    assert _wait_for(lambda: _outcome(server, "cancelled", "mm_language_stream") == before + 1, timeout_s=3.0)
    _assert_idle(server)
    client.close()


def test_an_abandoned_ensemble_stream_runs_to_its_bound_and_frees_everything(server, image):
    """Triton 2.51 passes neither a client's cancellation nor its disconnect through an ensemble (the
    language model's sends keep succeeding): the sequence runs to max_tokens (or its TIMEOUT_MS, the bound to
    use on ensembles) and then frees its slot and blocks. A sink whose send fails would cancel it."""
    before = {o: _outcome(server, o, "mm_language_stream") for o in ("cancelled", "length")}
    got = threading.Event()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got.set())
    image_in = grpcclient.InferInput("IMAGE", [1], "BYTES")
    image_in.set_data_from_numpy(np.array([image], dtype=np.object_))
    inputs = [image_in] + _grpc_inputs(np.array([b"x"], dtype=np.object_), LONG)[1:]
    t0 = time.monotonic()
    client.async_stream_infer("mm_pipeline_stream", inputs)
    assert got.wait(30)
    client.stop_stream(cancel_requests=True)
    client.close()
    ended = lambda o: _outcome(server, o, "mm_language_stream") > before[o]  # noqa: E731
    assert _wait_for(lambda: ended("cancelled") or ended("length"), timeout_s=30)
    print(
        f"ensemble stream closed by the client: ended as {'cancelled' if ended('cancelled') else 'length'} "
        f"after {time.monotonic() - t0:.2f} s"
    )
    _assert_idle(server)
