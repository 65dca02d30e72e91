"""The language engine through a real tritonserver (the session server of model_repository/): the correctness
oracle under in-flight batching for mm_pipeline AND the streaming path, streaming over gRPC and HTTP SSE,
throughput that grows with concurrency, and perf_analyzer in streaming mode against mm_pipeline_stream."""

from __future__ import annotations

import json
import queue
import random
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from harness import metric_value
from internal import internal_token, with_token
from mm_bench import perf
from mm_bench.images import make_test_image
from mm_client import MMClient

pytestmark = pytest.mark.integration
# name -> (embedding tokens, seed); at the default 1024-token window: no continuation, one, two
IMAGES = {"small": (96, 21), "one_cont": (1500, 22), "two_cont": (2500, 23)}
PROMPTS = [
    "Hi",
    "Describe the image.",
    "What is unusual here? Answer in one long, detailed sentence please.",
    "List three colours you can see, then say which one covers the largest area of the picture.",
]
IMAGE_SETS = [[], ["small"], ["one_cont"], ["two_cont"], ["small", "one_cont"], ["two_cont", "small", "small"]]
MAX_TOKENS = [1, 3, 8, 13, 21]
PATHS = ["unary-http", "unary-grpc", "stream-grpc"]


@pytest.fixture(scope="module")
def images(tiny_model_dir):
    return {name: make_test_image(tokens=t, seed=s, model_dir=tiny_model_dir) for name, (t, s) in IMAGES.items()}


def _language_direct(server, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    """A request without images goes to the language model itself (the ensembles need at least one image)."""
    arrays = {
        "EMBED_REF": np.array([], dtype=np.object_),
        "PROMPT": np.array([prompt.encode()], dtype=np.object_),
        "MAX_TOKENS": np.array([max_tokens], dtype=np.int32),
    }
    arrays = with_token(server, model, arrays)  # white-box: the internal models refuse clients
    outputs = ("TEXT", "TOKEN_IDS", "FINISH_REASON", "COMPLETION_TOKENS")
    if not stream:
        client = httpclient.InferenceServerClient(server.http_address, network_timeout=300)
        inputs = []
        for name, arr in arrays.items():
            t = httpclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == np.object_ else "INT32")
            t.set_data_from_numpy(arr)
            inputs.append(t)
        r = client.infer(model, inputs)
        return {
            "ids": r.as_numpy("TOKEN_IDS").tolist(),
            "reason": r.as_numpy("FINISH_REASON")[0].decode(),
            "completion": int(r.as_numpy("COMPLETION_TOKENS")[0]),
        }
    got = _stream_raw(server, model, arrays, outputs)
    return {"ids": got["ids"], "reason": got["reason"], "completion": got["completion"]}


def _stream_raw(server, model: str, arrays: dict, outputs) -> dict:
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        inputs = []
        for name, arr in arrays.items():
            t = grpcclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == np.object_ else "INT32")
            t.set_data_from_numpy(arr)
            inputs.append(t)
        client.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
        ids, responses = [], 0
        while True:
            result, error = answers.get(timeout=300)
            if error is not None:
                raise error
            responses += 1
            ids += result.as_numpy("TOKEN_IDS").tolist()
            reason = result.as_numpy("FINISH_REASON")
            if reason is not None:
                return {
                    "ids": ids,
                    "reason": reason[0].decode(),
                    "responses": responses,
                    "completion": int(result.as_numpy("COMPLETION_TOKENS")[0]),
                }
    finally:
        client.stop_stream()
        client.close()


def _one(server, images, spec: dict) -> dict:
    time.sleep(spec["delay"])  # staggered arrivals: requests join a batch that is already decoding
    blobs = [images[n] for n in spec["images"]]
    stream = spec["path"] == "stream-grpc"
    if not blobs:
        model = "mm_language_stream" if stream else "mm_language"
        return _language_direct(server, model, spec["prompt"], spec["max_tokens"], stream)
    protocol = "http" if spec["path"] == "unary-http" else "grpc"
    url = server.http_url if protocol == "http" else server.grpc_url
    with MMClient(url, protocol=protocol, timeout_s=300) as client:
        if stream:
            r = client.generate_stream(blobs, spec["prompt"], max_tokens=spec["max_tokens"])
        else:
            r = client.generate(blobs, spec["prompt"], max_tokens=spec["max_tokens"])
    return {
        "ids": r.token_ids,
        "reason": r.finish_reason,
        "completion": r.completion_tokens,
        "prompt_tokens": r.prompt_tokens,
    }


def _wait_idle(server, timeout_s: float = 20.0) -> dict:
    """Until no pool block and no KV slot is held anywhere (or the timeout): the metrics then."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        held = sum(v for (name, _), v in m.items() if name in ("mm_pool_blocks_used", "mm_engine_kv_slots_used"))
        if held == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_oracle_under_batching_for_the_pipeline_and_the_stream(mm_server, images, monolithic_tokens):
    """24 concurrent requests (0..3 images, some needing 1-2 continuations; mixed prompts, max tokens, arrival
    times and answer paths) give exactly the greedy tokens of the monolithic model run on each alone."""
    rnd = random.Random(12)
    specs = [
        {
            "images": IMAGE_SETS[i % len(IMAGE_SETS)],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": MAX_TOKENS[i % len(MAX_TOKENS)],
            "path": PATHS[i % len(PATHS)],
            "delay": rnd.uniform(0, 1.5),
        }
        for i in range(24)
    ]
    before = mm_server.metrics()
    with ThreadPoolExecutor(len(specs)) as pool:
        results = list(pool.map(lambda s: _one(mm_server, images, s), specs))
    for spec, got in zip(specs, results):
        expected = monolithic_tokens([images[n] for n in spec["images"]], spec["prompt"], spec["max_tokens"])
        assert got["ids"] == expected, spec
        assert got["completion"] == len(expected), spec
        assert got["reason"] in (("length", "stop") if len(expected) == spec["max_tokens"] else ("stop",)), spec
    after = _wait_idle(mm_server)
    for name in ("mm_pool_blocks_used", "mm_engine_kv_slots_used"):
        assert sum(v for (n, _), v in after.items() if n == name) == 0, name
    conts = (
        metric_value(after, "mm_transfer_continuations_total", model="mm_language_stream")
        + metric_value(after, "mm_transfer_continuations_total", model="mm_language")
        - metric_value(before, "mm_transfer_continuations_total", model="mm_language_stream")
        - metric_value(before, "mm_transfer_continuations_total", model="mm_language")
    )
    assert conts >= 8  # the batch really mixed pulls that needed continuations


def test_stream_sends_one_response_per_token_and_final_on_the_last(mm_server, images, monolithic_tokens):
    arrays = {
        "IMAGE": np.array([images["one_cont"]], dtype=np.object_),
        "PROMPT": np.array([b"Describe the image."], dtype=np.object_),
        "MAX_TOKENS": np.array([6], dtype=np.int32),
    }
    got = _stream_raw(
        mm_server, "mm_pipeline_stream", arrays, ("TEXT", "TOKEN_IDS", "FINISH_REASON", "COMPLETION_TOKENS")
    )
    expected = monolithic_tokens([images["one_cont"]], "Describe the image.", 6)
    assert got["ids"] == expected
    assert got["responses"] == len(expected) + 1  # one per token, then the summary (FINAL, never empty)


def test_http_generate_stream_sse(mm_server, images, monolithic_tokens):
    """HTTP generate_stream (SSE) on the decoupled language model: EMBED_REF is JSON text, so it fits the
    generate extension's JSON body (the ensemble's IMAGE bytes do not: use gRPC streaming for those)."""
    client = httpclient.InferenceServerClient(mm_server.http_address, network_timeout=120)
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([images["small"]], dtype=np.object_))
    token = internal_token(mm_server)  # white-box: the internal models refuse clients
    token_in = httpclient.InferInput("MM_INTERNAL_TOKEN", [1], "BYTES")
    token_in.set_data_from_numpy(np.array([token.encode()], dtype=np.object_))
    ref = client.infer("mm_encoder", [image, token_in]).as_numpy("EMBED_REF")[0].decode()
    body = json.dumps(
        {"EMBED_REF": [ref], "PROMPT": "Describe the image.", "MAX_TOKENS": 5, "MM_INTERNAL_TOKEN": token}
    ).encode()
    req = urllib.request.Request(
        f"http://{mm_server.http_address}/v2/models/mm_language_stream/generate_stream",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [
            json.loads(line[len("data: ") :]) for line in r.read().decode().splitlines() if line.startswith("data: ")
        ]
    ids = []
    for e in events:
        ids += e["TOKEN_IDS"] if isinstance(e["TOKEN_IDS"], list) else [e["TOKEN_IDS"]]
    assert ids == monolithic_tokens([images["small"]], "Describe the image.", 5)
    assert len(events) == 6 and events[-1]["FINISH_REASON"] == "length" and events[-1]["COMPLETION_TOKENS"] == 5


def _rate(server, images, concurrency: int, n: int) -> float:
    def call(i: int) -> None:
        with MMClient(server.grpc_url, protocol="grpc", timeout_s=300) as client:
            client.generate([images["small"]], PROMPTS[i % len(PROMPTS)], max_tokens=48)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, range(n)))
    return n / (time.perf_counter() - t0)


def test_throughput_grows_with_concurrency(mm_server, images):
    """Requests join the running batch: 8 at once finish much faster than 8 one after the other (the old
    one-request-at-a-time mm_language gave the same requests/s at any concurrency)."""
    _rate(mm_server, images, 2, 2)  # warm
    serial = _rate(mm_server, images, 1, 8)
    batched = _rate(mm_server, images, 8, 8)
    assert batched > 1.5 * serial, (serial, batched)


def test_perf_analyzer_streaming_against_mm_pipeline_stream(mm_server, images, tmp_path):
    pa = perf.find_perf_analyzer()
    if pa is None:
        pytest.skip("perf_analyzer is not installed (tritonclient 2.51 wheel)")
    data = perf.write_input_data(tmp_path / "in.json", [perf.request_entry([images["small"]], "Describe", 4)])
    export = tmp_path / "profile.json"
    cmd = perf.command(
        pa,
        "mm_pipeline_stream",
        mm_server.grpc_url,
        data,
        tmp_path / "out.csv",
        concurrency=2,
        request_count=8,
        profile_export=export,
        extra=["--streaming"],
    )
    from harness import server_env  # perf_analyzer needs the wheel's libcudart on LD_LIBRARY_PATH

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=server_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    requests = [r for e in perf.load_profile_export(export)["experiments"] for r in e["requests"]]
    assert len(requests) >= 8
    for r in requests:  # 4 token responses + the summary, each timestamped: TTFT and inter-token latency
        assert len(r["response_timestamps"]) == 5
