"""The OpenAI-compatible API through a real tritonserver and the real API server, with the official
``openai`` client: streamed == non-streamed == the monolithic oracle, multi-turn, text-only, base64 and
local-URL images, sampling, stop strings, usage, OpenAI-style errors, request ids, metrics, and a client
that disconnects mid-stream (its blocks and KV slot come back)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient

from harness import free_port, metric_value
from mm_bench.images import make_test_image
from mm_models.chat import parse_messages
from mm_openai.process import APIServerProcess

pytestmark = pytest.mark.integration
MODEL = "tiny"
MAX_BODY = 2_000_000
LOG_DIR = Path(__file__).resolve().parent.parent.parent / ".cache" / "logs" / "tests"


@pytest.fixture(scope="module")
def pictures(tiny_model_dir):
    return {
        "a": make_test_image(tokens=96, seed=11, model_dir=tiny_model_dir),
        "b": make_test_image(tokens=1500, seed=12, model_dir=tiny_model_dir),
    }  # needs a continuation


@pytest.fixture(scope="module")
def api(mm_server):
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / "openai-api.log"
    log.unlink(missing_ok=True)
    from mm_triton.access import write_token_file

    token_file = write_token_file(mm_server.pid, f"openai-test-{os.getpid()}.key")  # as scripts/serve does
    server = APIServerProcess(
        [
            "--triton-url",
            mm_server.grpc_url,
            "--served-model-name",
            MODEL,
            "--max-body-bytes",
            str(MAX_BODY),
            "--log-level",
            "info",
            "--internal-token-file",
            str(token_file),
        ],
        "127.0.0.1",
        free_port(),
        log_file=log,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def client(api):
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def chat_oracle(tiny_model_dir):
    """Greedy tokens + text of the monolithic model in this process, for a conversation in wire form."""
    from mm_models.images import decode_image
    from mm_models.qwen2vl import MonolithicModel

    model = MonolithicModel.from_pretrained(tiny_model_dir)

    def expected(messages: list[dict], images: list[bytes], max_tokens: int) -> tuple[list[int], str]:
        ids = model.generate([decode_image(b, 64_000_000) for b in images], parse_messages(messages), max_tokens)
        return ids, model.decode(ids)

    return expected


@pytest.fixture(scope="module")
def image_server(pictures, tmp_path_factory):
    """A plain http.server on loopback serving the test pictures (the allowed default for image URLs)."""
    root = tmp_path_factory.mktemp("images")
    for name, data in pictures.items():
        (root / f"{name}.png").write_bytes(data)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def to_wire(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the MESSAGES wire form the oracle renders (image_url parts -> {"type": "image"})."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def stream_text(client, **kw) -> tuple[str, str, object, int]:
    """(text, finish_reason, usage, content chunks) of a streamed completion."""
    text, reason, usage, n = "", None, None, 0
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            if choice.delta.content:
                text += choice.delta.content
                n += 1
            reason = choice.finish_reason or reason
    return text, reason, usage, n


def wait_idle(server, timeout_s: float = 30.0) -> dict:
    """Triton metrics once no block, KV slot or sequence is held (or the last ones seen at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        held = sum(
            metric_value(m, name, 0.0)
            for name in (
                "mm_pool_blocks_used",
                "mm_engine_kv_slots_used",
                "mm_engine_running_sequences",
                "mm_engine_waiting_sequences",
            )
        )
        if held == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def assert_idle(server) -> None:
    m = wait_idle(server)
    for name in ("mm_pool_blocks_used", "mm_engine_kv_slots_used", "mm_engine_running_sequences"):
        assert metric_value(m, name, 0.0) == 0, name


CASES = {
    "text_only": lambda p: ([{"role": "user", "content": "Hello, who are you?"}], []),
    "one_image": lambda p: (
        [{"role": "user", "content": [image_part(data_url(p["a"])), {"type": "text", "text": "Describe the image."}]}],
        [p["a"]],
    ),
    "multi_turn_two_images": lambda p: (
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": [image_part(data_url(p["a"])), {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A pattern."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(data_url(p["b"]))]},
        ],
        [p["a"], p["b"]],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_stream_equals_unary_equals_oracle(client, mm_server, pictures, chat_oracle, case):
    messages, images = CASES[case](pictures)
    max_tokens = 12
    ids, text = chat_oracle(to_wire(messages), images, max_tokens)
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    choice = unary.choices[0]
    assert choice.message.content == text and choice.message.role == "assistant"
    assert unary.usage.completion_tokens == len(ids)
    assert unary.usage.prompt_tokens > 0 and unary.usage.total_tokens == unary.usage.prompt_tokens + len(ids)
    assert choice.finish_reason == ("length" if len(ids) == max_tokens else "stop")
    s_text, s_reason, s_usage, n_chunks = stream_text(
        client, model=MODEL, messages=messages, max_completion_tokens=max_tokens, temperature=0
    )
    assert (s_text, s_reason) == (text, choice.finish_reason)
    assert s_usage.completion_tokens == len(ids) and s_usage.prompt_tokens == unary.usage.prompt_tokens
    assert n_chunks > 1, "the answer should arrive in several chunks (token streaming)"
    assert_idle(mm_server)


def test_kserve_messages_input_equals_oracle_tokens(mm_server, pictures, chat_oracle):
    """The KServe v2 path gains the same MESSAGES input; its TOKEN_IDS equal the oracle's exactly."""
    messages = to_wire(CASES["multi_turn_two_images"](pictures)[0])
    ids, text = chat_oracle(messages, [pictures["a"], pictures["b"]], 8)
    c = grpcclient.InferenceServerClient(mm_server.grpc_url)
    tensors = {
        "IMAGE": np.array([pictures["a"], pictures["b"]], dtype=np.object_),
        "MESSAGES": np.array([json.dumps(messages).encode()], dtype=np.object_),
        "MAX_TOKENS": np.array([8], dtype=np.int32),
    }
    inputs = []
    for name, arr in tensors.items():
        t = grpcclient.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == np.object_ else "INT32")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    for model in ("mm_pipeline", "mm_monolithic"):
        result = c.infer(model, inputs)
        assert result.as_numpy("TOKEN_IDS").tolist() == ids, model
        assert result.as_numpy("TEXT")[0].decode() == text
    # text-only over KServe: IMAGE of shape [0] and a plain PROMPT
    img = grpcclient.InferInput("IMAGE", [0], "BYTES")
    img.set_data_from_numpy(np.zeros((0,), dtype=np.object_))
    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Hello"], dtype=np.object_))
    ids_text_only, _ = chat_oracle([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], [], 32)
    assert c.infer("mm_pipeline", [img, prompt]).as_numpy("TOKEN_IDS").tolist() == ids_text_only


def test_kserve_v2_json_with_a_data_url_image(mm_server, pictures, chat_oracle):
    """What the README's KServe curl does: plain JSON, the image as a data: URL, MESSAGES and sampling inputs."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}]
    body = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [data_url(pictures["a"])]},
            {"name": "MESSAGES", "datatype": "BYTES", "shape": [1], "data": [json.dumps(messages)]},
            {"name": "MAX_TOKENS", "datatype": "INT32", "shape": [1], "data": [8]},
            {"name": "TEMPERATURE", "datatype": "FP32", "shape": [1], "data": [0.0]},
        ]
    }
    resp = httpx.post(f"{mm_server.http_url}/v2/models/mm_pipeline/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o["data"] for o in resp.json()["outputs"]}
    ids, text = chat_oracle(messages, [pictures["a"]], 8)
    assert outputs["TOKEN_IDS"] == ids and outputs["TEXT"] == [text]
    assert outputs["FINISH_REASON"] == ["length" if len(ids) == 8 else "stop"]


def test_local_url_image_equals_base64(client, pictures, image_server):
    def ask(url):
        return client.chat.completions.create(
            model=MODEL,
            max_tokens=8,
            temperature=0,
            messages=[{"role": "user", "content": [image_part(url), {"type": "text", "text": "Describe"}]}],
        ).choices[0]

    assert ask(f"{image_server}/b.png").message.content == ask(data_url(pictures["b"])).message.content


def test_seeded_sampling_is_reproducible(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=16,
        temperature=1.0,
        top_p=0.95,
        extra_body={"top_k": 50},
    )
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    streamed, _, _, _ = stream_text(client, seed=1234, **kw)
    assert a == b == streamed
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should give different samples"


def test_stop_string_cuts_the_answer(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = next(
        full[i : i + 2]
        for i in range(3, len(full) - 2)
        if full[i : i + 2].strip() == full[i : i + 2] and "\ufffd" not in full[i : i + 2]
    )
    cut = client.chat.completions.create(stop=[stop, "never-seen-stop"], **kw).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"
    s_text, s_reason, _, _ = stream_text(client, stop=stop, **kw)
    assert (s_text, s_reason) == (cut.message.content, "stop")


def test_models_health_and_metrics(api, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{api.url}/health")
    assert health.status_code == 200 and health.json()["triton"]["mm_pipeline"] is True
    text = httpx.get(f"{api.url}/metrics").text
    assert re.search(r'mm_openai_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', text), text
    assert "mm_openai_request_duration_seconds_bucket" in text and "mm_openai_time_to_first_token_seconds" in text
    for method, path, status in (
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/models/other", 404),
    ):
        resp = httpx.request(method, f"{api.url}{path}")
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def _raw(api, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{api.url}/v1/chat/completions",
        content=data,
        timeout=60,
        headers={"content-type": "application/json", **(headers or {})},
    )


BAD = {
    "malformed_json": (b'{"model": "tiny", "messages": [', 400, None),
    "unknown_model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    "bad_image": (
        {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        image_part("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()),
                        {"type": "text", "text": "x"},
                    ],
                }
            ],
        },
        400,
        None,
    ),
    "oversized_body": ({"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}, 413, None),
    "url_not_allowed": (
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [image_part("http://10.255.255.1/cat.png"), {"type": "text", "text": "x"}]}
            ],
        },
        400,
        "messages[0].content[0].image_url.url",
    ),
    "file_url": (
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [image_part("file:///etc/passwd"), {"type": "text", "text": "x"}]}
            ],
        },
        400,
        None,
    ),
    "max_tokens_zero": (
        {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        400,
        "max_tokens",
    ),
    "max_tokens_huge": (
        {"model": MODEL, "max_tokens": 10**6, "messages": [{"role": "user", "content": "x"}]},
        400,
        "max_tokens",
    ),
    "n_two": ({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "x"}]}, 400, "n"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors_and_server_stays_healthy(api, client, mm_server, case):
    body, status, param = BAD[case]
    resp = _raw(api, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    # the official client raises the matching exception class
    if not isinstance(body, bytes) and status != 413:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**body)
        assert info.value.status_code == status
    for stream in (False, True):  # stream requests fail the same way before any chunk
        if isinstance(body, dict):
            again = _raw(api, {**body, "stream": True}) if stream else resp
            assert again.status_code == status
    assert httpx.get(f"{api.url}/health").status_code == 200
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.usage.completion_tokens >= 1
    assert_idle(mm_server)


def test_request_id_reaches_triton_and_logs(api, mm_server):
    rid = f"oai-test-{int(time.time() * 1000)}"
    resp = _raw(api, BAD["bad_image"][0], headers={"x-request-id": rid})
    assert resp.status_code == 400 and resp.headers["x-request-id"] == rid
    assert resp.json()["error"]["message"].startswith(("IMAGE[0]", "invalid input")), resp.json()
    ok = _raw(
        api,
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"x-request-id": rid + "-ok"},
    )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == rid + "-ok"
    assert ok.json()["id"] == f"chatcmpl-{rid}-ok"
    deadline = time.monotonic() + 5
    while rid not in mm_server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rid in mm_server.log_text(), "the request id should appear in the Triton log of the failed request"
    assert rid in Path(api.log_file).read_text()


def test_triton_unavailable_is_503(tmp_path):
    """An API server whose Triton is not there answers 503 with an error object, and /health says so."""
    with APIServerProcess(
        ["--triton-url", f"127.0.0.1:{free_port()}", "--served-model-name", MODEL, "--request-timeout-s", "5"],
        "127.0.0.1",
        free_port(),
        log_file=tmp_path / "api.log",
    ) as api:
        resp = _raw(api, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{api.url}/health").status_code == 503


@pytest.mark.parametrize("route", ["direct", "ensemble"])
def test_client_disconnect_mid_stream_frees_blocks_and_kv_slot(api, mm_server, pictures, tmp_path, route):
    """direct (the default): the disconnect cancels the sequence at once. ensemble: Triton 2.51 does not pass
    the cancellation through mm_pipeline_stream, so the sequence runs to max_tokens, then frees everything."""
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 1000,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [image_part(data_url(pictures["b"])), {"type": "text", "text": "Describe at length."}],
            }
        ],
    }
    server = (
        api
        if route == "direct"
        else APIServerProcess(
            ["--triton-url", mm_server.grpc_url, "--served-model-name", MODEL, "--stream-via", "ensemble"],
            "127.0.0.1",
            free_port(),
            log_file=tmp_path / "api-ensemble.log",
        ).start()
    )
    try:
        before = mm_server.metrics()
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                events = 0
                for line in resp.iter_lines():
                    events += line.startswith("data: ")
                    if events >= 3:
                        break  # leave mid-stream: the connection is closed here
        t0 = time.monotonic()
        m = wait_idle(mm_server, timeout_s=120)
        freed_after = time.monotonic() - t0
        for name in ("mm_pool_blocks_used", "mm_engine_kv_slots_used", "mm_engine_running_sequences"):
            assert metric_value(m, name, 0.0) == 0, f"{name} still held {freed_after:.1f} s after the disconnect"
        generated = metric_value(m, "mm_engine_generated_tokens_total", 0.0) - metric_value(
            before, "mm_engine_generated_tokens_total", 0.0
        )
        cancelled = metric_value(m, "mm_engine_requests_total", 0.0, outcome="cancelled") - metric_value(
            before, "mm_engine_requests_total", 0.0, outcome="cancelled"
        )
        print(
            f"\n{route}: slot and blocks free {freed_after:.2f} s after the disconnect; "
            f"{generated:.0f} tokens generated; {cancelled:.0f} cancelled"
        )
        if route == "direct":
            assert cancelled == 1 and generated < 1000
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        if server is not api:
            server.stop()
