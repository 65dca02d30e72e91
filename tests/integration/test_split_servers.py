"""Split deployment on this machine (loopback): one encoder server (model_repositories/encoder_server) and
two language servers (model_repositories/language_server) sharing it, each its own tritonserver process.

The correctness oracle runs through them (greedy tokens == the monolithic model's), including images that
need continuations and several images per request; every server's pools are back to 0 after each test.
Also: clear errors through the language server, an unreachable encoder server (UNAVAILABLE naming its URL),
fail-over to the next encoder URL, and ``scripts/serve --role language ... --demo --exit``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import REPO_ROOT, TritonServer, free_port, metric_value
from mm_bench.images import make_test_image, tokens_for_image_size
from mm_client import MMClient
from mm_remote.repository import SOURCES, build_repository

pytestmark = pytest.mark.integration
PROMPT = "Describe the image."
MAX_TOKENS = 6
WINDOW = 1024
# name -> (tokens wanted, seed); at the default 1024-token window: no continuation, 1, 2
IMAGES = {"small": (96, 21), "one_cont": (1500, 22), "two_cont": (2500, 23)}


@pytest.fixture(scope="module")
def images(tiny_model_dir):
    return {name: make_test_image(tokens=t, seed=s, model_dir=tiny_model_dir) for name, (t, s) in IMAGES.items()}


@pytest.fixture(scope="module")
def image_tokens(images, tiny_model_dir):
    import io

    from PIL import Image

    return {n: tokens_for_image_size(tiny_model_dir, *Image.open(io.BytesIO(b)).size) for n, b in images.items()}


@pytest.fixture(scope="module")
def oracle(monolithic_tokens):
    def expected(image_bytes, prompt=PROMPT, max_tokens=MAX_TOKENS):
        return monolithic_tokens(image_bytes, prompt, max_tokens)

    return expected


class Split:
    def __init__(self, encoder: TritonServer, languages: list[TritonServer], dead_url: str):
        self.encoder, self.languages, self.dead_url = encoder, languages, dead_url

    @property
    def all(self) -> list[TritonServer]:
        return [self.encoder, *self.languages]


@pytest.fixture(scope="module")
def split(tiny_model_dir, tmp_path_factory):
    """1 encoder server, 2 language servers; the second lists an unreachable encoder URL first."""
    log_dir = REPO_ROOT / ".cache" / "logs" / "tests"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {"MM_CHECKPOINT": str(tiny_model_dir)}
    servers: list[TritonServer] = []
    try:
        t0 = time.monotonic()
        encoder = TritonServer(
            SOURCES["encoder"], env=env, log_file=log_dir / "split-encoder.log", startup_timeout_s=300
        )
        servers.append(encoder.start())
        dead_url = f"127.0.0.1:{free_port()}"
        urls = [encoder.grpc_url, f"{dead_url},{encoder.grpc_url}"]
        for i, url in enumerate(urls):
            language = TritonServer(
                SOURCES["language"],
                env={**env, "MM_ENCODER_URLS": url},
                log_file=log_dir / f"split-language-{i}.log",
                startup_timeout_s=300,
            )
            servers.append(language.start())
        print(f"split servers up in {time.monotonic() - t0:.1f} s")
        yield Split(servers[0], servers[1:], dead_url)
        for server in servers:
            assert _pools_empty(server), f"{server}: blocks still in use at the end"
    finally:
        for server in servers:
            server.stop()


def _pools_empty(server: TritonServer, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if metric_value(server.metrics(), "mm_pool_blocks_used", 0.0) == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.fixture
def clean(split):
    yield split
    for server in split.all:
        assert _pools_empty(server), f"{server}: mm_pool_blocks_used did not return to 0"


def _generate(server, image_list, prompt=PROMPT, max_tokens=MAX_TOKENS, protocol="grpc"):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with MMClient(url, protocol=protocol, timeout_s=300) as client:
        return client.generate(image_list, prompt, max_tokens=max_tokens)


def _m(server, name, **labels) -> float:
    return metric_value(server.metrics(), name, 0.0, **labels)


# ---- correctness oracle --------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("name", ["small", "two_cont"])
def test_oracle_through_split_servers(clean, images, image_tokens, oracle, name, protocol):
    language = clean.languages[0]
    before = _m(language, "mm_transfer_continuations_total", model="mm_language")
    encoded_before = _m(clean.encoder, "mm_images_encoded_total")
    result = _generate(language, [images[name]], protocol=protocol)
    assert result.token_ids == oracle([images[name]])
    assert len(result.token_ids) == MAX_TOKENS
    conts = _m(language, "mm_transfer_continuations_total", model="mm_language") - before
    assert conts == math.ceil(image_tokens[name] / WINDOW) - 1
    if name == "two_cont":
        assert conts == 2
    assert _m(clean.encoder, "mm_images_encoded_total") - encoded_before == 1


def test_several_images_in_prompt_order(clean, images, oracle):
    order = [images["one_cont"], images["small"], images["two_cont"]]
    language = clean.languages[1]
    assert _generate(language, order).token_ids == oracle(order)
    assert _generate(language, order[::-1], protocol="http").token_ids == oracle(order[::-1])


def test_two_language_servers_share_one_encoder_server(clean, images, oracle):
    mix = ["small", "two_cont", "one_cont", "small", "two_cont", "one_cont", "small", "small"]
    servers = clean.languages
    before = [_m(s, "mm_transfers_total", model="mm_language") for s in servers]
    encoded_before = _m(clean.encoder, "mm_images_encoded_total")

    def one(i):
        return _generate(servers[i % 2], [images[mix[i]]], protocol="grpc" if i % 4 < 2 else "http").token_ids

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(mix)) as pool:
        results = list(pool.map(one, range(len(mix))))
    print(f"{len(mix)} concurrent requests over 2 language servers: {time.monotonic() - t0:.2f} s")
    for name, got in zip(mix, results):
        assert got == oracle([images[name]]), name
    for server, b in zip(servers, before):
        assert _m(server, "mm_transfers_total", model="mm_language") - b == len(mix) // 2
    assert _m(clean.encoder, "mm_images_encoded_total") - encoded_before == len(mix)


def test_failover_skips_the_unreachable_encoder_url(clean, images, oracle):
    """The second language server lists a dead URL first: requests still succeed, the skip is counted."""
    language = clean.languages[1]
    for _ in range(3):
        assert _generate(language, [images["small"]]).token_ids == oracle([images["small"]])
    m = language.metrics()
    assert metric_value(m, "mm_remote_encoder_requests_total", encoder=clean.dead_url, outcome="unavailable") >= 1
    assert metric_value(m, "mm_remote_encoder_requests_total", encoder=clean.dead_url, outcome="ok") == 0
    assert metric_value(m, "mm_remote_encoder_requests_total", encoder=clean.encoder.grpc_url, outcome="ok") >= 3


# ---- errors ------------------------------------------------------------------------------------------
def _infer(server, image_list, prompt=b"Describe", max_tokens=None):
    client = httpclient.InferenceServerClient(server.http_address, network_timeout=120)
    inputs = [httpclient.InferInput("IMAGE", [len(image_list)], "BYTES"), httpclient.InferInput("PROMPT", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array(image_list, dtype=np.object_).reshape(len(image_list)))
    inputs[1].set_data_from_numpy(np.array([prompt], dtype=np.object_))
    if max_tokens is not None:
        inputs.append(httpclient.InferInput("MAX_TOKENS", [1], "INT32"))
        inputs[-1].set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    try:
        return client.infer("mm_pipeline", inputs)
    finally:
        client.close()  # an open keep-alive connection would hold the server's shutdown for its exit timeout


@pytest.mark.parametrize(
    "case, message",
    [
        ("corrupt", r"IMAGE\[0\].*\(encoder server 127\.0\.0\.1:\d+\)"),
        ("second_image_bad", r"IMAGE\[1\]"),
        ("empty_prompt", "PROMPT: must not be empty"),
        ("max_tokens_zero", r"MAX_TOKENS: must be in \[1, 1024\]"),
    ],
)
def test_bad_input_is_invalid_arg_and_frees_the_encoder(clean, images, case, message):
    good = images["two_cont"]
    kwargs = {
        "corrupt": dict(image_list=[good[: len(good) // 2]]),
        "second_image_bad": dict(image_list=[good, b"\x89PNG\r\n\x1a\n broken"]),
        "empty_prompt": dict(image_list=[good], prompt=b"   "),
        "max_tokens_zero": dict(image_list=[good], max_tokens=0),
    }[case]
    with pytest.raises(InferenceServerException, match=message) as info:
        _infer(clean.languages[0], **kwargs)
    assert "400" in str(info.value.status())
    # refused after encoding (prompt, max_tokens): the encoder's blocks are aborted at once, not left to the TTL
    assert _pools_empty(clean.encoder, timeout_s=5)
    assert _infer(clean.languages[0], [images["small"]], max_tokens=1).as_numpy("TOKEN_IDS").shape == (1,)


def test_unreachable_encoder_server_is_unavailable_with_its_url(tiny_model_dir, tmp_path, triton_server):
    """A language server whose only encoder server is down answers UNAVAILABLE naming the URL (gRPC and
    HTTP). Only mm_pipeline is loaded here: the encoder step fails before mm_language would run."""
    dead = f"127.0.0.1:{free_port()}"
    repo = build_repository(tmp_path / "repo", "language", models=["mm_pipeline"], pipeline_instances=1)
    server = triton_server(repo, env={"MM_ENCODER_URLS": dead, "MM_ENCODER_TIMEOUT_S": "20"})
    assert f"encoder server {dead}" in server.log_text()  # warned at load
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [grpcclient.InferInput("IMAGE", [1], "BYTES"), grpcclient.InferInput("PROMPT", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([make_test_image(32, 32)], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException, match=f"encoder server {dead} unavailable: unreachable") as info:
        client.infer("mm_pipeline", inputs)
    client.close()
    assert time.monotonic() - t0 < 10
    assert "UNAVAILABLE" in str(info.value.status())
    with pytest.raises(InferenceServerException, match=f"encoder server {dead} unavailable") as info:
        _infer(server, [make_test_image(32, 32)])
    assert "503" in str(info.value.status())


# ---- the command ---------------------------------------------------------------------------------------
def test_serve_language_role_demo(clean, tmp_path):
    """scripts/serve --role language --encoder-url HOST:PORT --demo --exit against the running encoder server."""
    base = free_port()
    while base + 2 > 65535 or not all(_free(p) for p in (base, base + 1, base + 2)):
        base = free_port()
    cmd = [
        sys.executable,
        "scripts/serve.py",
        "--role",
        "language",
        "--encoder-url",
        clean.encoder.grpc_url,
        "--port-base",
        str(base),
        "--address",
        "127.0.0.1",
        "--demo",
        "--exit",
        "--demo-max-tokens",
        "3",
        "--log-file",
        str(tmp_path / "serve.log"),
    ]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "role language" in r.stdout and f"encoders {clean.encoder.grpc_url}" in r.stdout
    assert "--- answer (3 tokens" in r.stdout
    assert f"MM_ENCODER_URLS={clean.encoder.grpc_url}" in r.stdout


def _free(port: int) -> bool:
    from harness import port_is_free

    return port_is_free(port)
