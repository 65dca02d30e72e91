"""The product through a real tritonserver: correctness oracle, concurrency, several
images, metrics, and clear errors on bad input (the server keeps serving)."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import metric_value
from internal import with_token
from mm_bench.images import make_test_image, tokens_for_image_size
from mm_client import MMClient

pytestmark = pytest.mark.integration
WINDOW = 1024
PROMPT = "Describe the image."
MAX_TOKENS = 6
# name -> (tokens wanted, seed); continuations at the default 1024-token window: 0, 1, 2, 5+
IMAGES = {"small": (96, 1), "one_cont": (1500, 2), "two_cont": (2500, 3), "three_cont": (4000, 4)}


@pytest.fixture(scope="session")
def images(tiny_model_dir):
    out = {}
    for name, (tokens, seed) in IMAGES.items():
        data = make_test_image(tokens=tokens, seed=seed, model_dir=tiny_model_dir)
        out[name] = data
    return out


@pytest.fixture(scope="session")
def image_tokens(images, tiny_model_dir):
    import io

    from PIL import Image

    return {
        name: tokens_for_image_size(tiny_model_dir, *Image.open(io.BytesIO(data)).size) for name, data in images.items()
    }


@pytest.fixture(scope="session")
def oracle(monolithic_tokens):
    """Greedy tokens of the monolithic model in this process (tests/conftest.py), with this module's defaults."""

    def expected(image_bytes: list[bytes], prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> list[int]:
        return monolithic_tokens(image_bytes, prompt, max_tokens)

    return expected


def _metrics(server):
    return server.metrics()


def _continuations(metrics) -> float:
    return metric_value(metrics, "mm_transfer_continuations_total", 0.0, model="mm_language")


def _wait_pools_empty(server, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        if metric_value(m, "mm_pool_blocks_used", 0.0) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_oracle_single_image(mm_server, images, image_tokens, oracle, protocol, name):
    url = mm_server.http_url if protocol == "http" else mm_server.grpc_url
    before = _continuations(_metrics(mm_server))
    with MMClient(url, protocol=protocol) as client:
        result = client.generate([images[name]], PROMPT, max_tokens=MAX_TOKENS)
    assert result.token_ids == oracle([images[name]])
    assert len(result.token_ids) == MAX_TOKENS and isinstance(result.text, str)
    expected_conts = math.ceil(image_tokens[name] / WINDOW) - 1
    assert _continuations(_metrics(mm_server)) - before == expected_conts
    if name == "three_cont":
        assert expected_conts >= 3


def test_oracle_several_images_in_prompt_order(mm_server, images, oracle):
    order = [images["one_cont"], images["small"], images["two_cont"]]
    with MMClient(mm_server.grpc_url, protocol="grpc") as client:
        result = client.generate(order, PROMPT, max_tokens=MAX_TOKENS)
        swapped = client.generate(order[::-1], PROMPT, max_tokens=MAX_TOKENS)
    assert result.token_ids == oracle(order)
    assert swapped.token_ids == oracle(order[::-1])


def test_max_tokens_is_optional(mm_server, images, oracle):
    with MMClient(mm_server.http_url) as client:
        result = client.generate([images["small"]], "Hi")
    assert result.token_ids == oracle([images["small"]], "Hi", 32)  # config default_max_tokens


def test_concurrent_small_and_huge_requests(mm_server, images, oracle):
    mix = ["small", "three_cont", "one_cont", "small", "two_cont", "three_cont", "small", "one_cont"]
    before = _metrics(mm_server)

    def one(i: int):
        protocol = "grpc" if i % 2 else "http"
        url = mm_server.grpc_url if protocol == "grpc" else mm_server.http_url
        with MMClient(url, protocol=protocol, timeout_s=300) as client:
            return client.generate([images[mix[i]]], PROMPT, max_tokens=MAX_TOKENS).token_ids

    with ThreadPoolExecutor(len(mix)) as pool:
        results = list(pool.map(one, range(len(mix))))
    for name, got in zip(mix, results):
        assert got == oracle([images[name]]), name
    after = _wait_pools_empty(mm_server)
    done = metric_value(after, "mm_transfers_total", model="mm_language") - metric_value(
        before, "mm_transfers_total", model="mm_language"
    )
    assert done == len(mix)
    calls = metric_value(after, "mm_encode_batch_images_count", model="mm_encoder") - metric_value(
        before, "mm_encode_batch_images_count", model="mm_encoder"
    )
    encoded = metric_value(after, "mm_encode_batch_images_sum", model="mm_encoder") - metric_value(
        before, "mm_encode_batch_images_sum", model="mm_encoder"
    )
    print(f"encoder: {encoded:.0f} image(s) in {calls:.0f} tower call(s)")  # cached images need none
    assert 0 <= calls <= encoded  # never more tower calls than images (one per image at worst)


def test_metrics_after_requests(mm_server, images):
    with MMClient(mm_server.http_url) as client:
        client.generate([images["two_cont"], images["small"]], PROMPT, max_tokens=2)
    m = _wait_pools_empty(mm_server)
    for model in ("mm_encoder", "mm_language"):
        assert metric_value(m, "mm_pool_blocks_used", model=model) == 0
        assert metric_value(m, "mm_pool_blocks_total", model=model) > 0
    assert metric_value(m, "mm_transfers_total", model="mm_language") >= 2
    assert metric_value(m, "mm_transfer_bytes_total", model="mm_language") > 0
    assert metric_value(m, "mm_transfer_latency_seconds_count", model="mm_language") >= 2
    assert metric_value(m, "mm_transfer_continuations_total", model="mm_language") >= 2


ENCODER_PHASES = ("queue", "image_decode", "preprocess", "vision", "publish", "response")
LANGUAGE_PHASES = ("queue", "transfer", "slot_wait", "prefill", "decode", "response")
MONOLITHIC_PHASES = ("queue", "image_decode", "preprocess", "vision", "slot_wait", "prefill", "decode", "response")


def _phase_counts(metrics, model: str, phases) -> dict[str, float]:
    return {p: metric_value(metrics, "mm_phase_seconds_count", 0.0, model=model, phase=p) for p in phases}


def _wait_phase_counts(server, before, models, n: int, timeout_s: float = 10.0) -> dict:
    """Metrics once every model's phases counted ``n`` more requests (or the last ones seen at the timeout).

    The engine models observe a request's phases after its answer has gone out, through a low-priority flusher
    thread (mm_triton/metric_flush.py), so a scrape right after the answer may not see the last one yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = _wait_pools_empty(server)
        done = all(
            _phase_counts(m, model, phases)[p] - _phase_counts(before, model, phases)[p] >= n
            for model, phases in models
            for p in phases
        )
        if done or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_phase_histograms_count_every_request(mm_server, tiny_model_dir):
    """mm_phase_seconds: one observation per phase per request on each model (a cache hit reports vision 0),
    the sums plausible."""
    before = _metrics(mm_server)
    n = 3
    fresh = [make_test_image(tokens=64, seed=900 + i, model_dir=tiny_model_dir) for i in range(n)]  # not cached
    for model in ("mm_pipeline", "mm_monolithic"):
        with MMClient(mm_server.http_url, model=model) as client:
            for image in fresh:
                client.generate([image], PROMPT, max_tokens=3)
    models = (("mm_encoder", ENCODER_PHASES), ("mm_language", LANGUAGE_PHASES), ("mm_monolithic", MONOLITHIC_PHASES))
    after = _wait_phase_counts(mm_server, before, models, n)
    for model, phases in models:
        got = _phase_counts(after, model, phases)
        was = _phase_counts(before, model, phases)
        assert {p: got[p] - was[p] for p in phases} == {p: n for p in phases}, model
        total = sum(
            metric_value(after, "mm_phase_seconds_sum", 0.0, model=model, phase=p)
            - metric_value(before, "mm_phase_seconds_sum", 0.0, model=model, phase=p)
            for p in phases
        )
        assert 0 < total < 60 * n, model
        inf = metric_value(after, "mm_phase_seconds_bucket", 0.0, model=model, phase=phases[-1], le="+Inf")
        assert inf >= n  # a real histogram, cumulative buckets up to +Inf
    # the engine's decode of 3 tokens and the encoder's tower are not free
    assert metric_value(after, "mm_phase_seconds_sum", model="mm_encoder", phase="vision") > 0
    assert metric_value(after, "mm_phase_seconds_sum", model="mm_language", phase="decode") > 0


def test_concurrent_requests_share_tower_calls(mm_server, tiny_model_dir, oracle):
    """Six concurrent requests with new images: those queued while the tower runs go through it together (fewer
    tower calls than images), and every answer still equals the oracle's."""
    fresh = [make_test_image(tokens=1024, seed=700 + i, model_dir=tiny_model_dir) for i in range(6)]
    before = _metrics(mm_server)

    def one(image):
        with MMClient(mm_server.grpc_url, protocol="grpc", timeout_s=300) as client:
            return client.generate([image], PROMPT, max_tokens=MAX_TOKENS).token_ids

    with ThreadPoolExecutor(len(fresh)) as pool:
        results = list(pool.map(one, fresh))
    for image, got in zip(fresh, results):
        assert got == oracle([image])
    after = _wait_pools_empty(mm_server)
    calls, images = (
        metric_value(after, f"mm_encode_batch_images_{k}", model="mm_encoder")
        - metric_value(before, f"mm_encode_batch_images_{k}", model="mm_encoder")
        for k in ("count", "sum")
    )
    assert images == len(fresh) and calls < images, (calls, images)


def _call_model(server, model: str, inputs: dict[str, np.ndarray]):
    client = httpclient.InferenceServerClient(server.http_address, network_timeout=120)
    inputs = with_token(server, model, inputs)  # white-box: the internal models refuse clients
    tensors = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == np.object_ else "INT32"
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return client.infer(model, tensors)


def test_forged_transfer_id_is_refused_and_counted(mm_server, images):
    """A guessed transfer id at a real encoder gets not_found; the real one still works."""
    before = metric_value(_metrics(mm_server), "mm_transfer_failures_total", 0.0, cause="not_found")
    real = _call_model(mm_server, "mm_encoder", {"IMAGE": np.array([images["small"]], dtype=np.object_)})
    real_ref = real.as_numpy("EMBED_REF")[0].decode()
    forged_ref = real_ref.replace(real_ref.split('"transfer_id":"')[1][:32], "ab" * 16)
    prompt = np.array([b"hi"], dtype=np.object_)
    with pytest.raises(InferenceServerException, match="not_found.*unknown transfer id"):
        _call_model(
            mm_server, "mm_language", {"EMBED_REF": np.array([forged_ref.encode()], dtype=np.object_), "PROMPT": prompt}
        )
    after = metric_value(_metrics(mm_server), "mm_transfer_failures_total", cause="not_found")
    assert after - before == 1
    ok = _call_model(
        mm_server,
        "mm_language",
        {
            "EMBED_REF": np.array([real_ref.encode()], dtype=np.object_),
            "PROMPT": prompt,
            "MAX_TOKENS": np.array([1], dtype=np.int32),
        },
    )
    assert ok.as_numpy("TOKEN_IDS").shape == (1,)
    assert metric_value(_wait_pools_empty(mm_server), "mm_pool_blocks_used") == 0


def test_rejected_request_frees_the_encoders_blocks(mm_server, images):
    """mm_language refuses a bad prompt before pulling; the encoder's blocks are aborted, not left to TTL."""
    real = _call_model(mm_server, "mm_encoder", {"IMAGE": np.array([images["two_cont"]], dtype=np.object_)})
    assert metric_value(_metrics(mm_server), "mm_pool_blocks_used", model="mm_encoder") > 0
    with pytest.raises(InferenceServerException, match="PROMPT"):
        _call_model(
            mm_server,
            "mm_language",
            {"EMBED_REF": real.as_numpy("EMBED_REF"), "PROMPT": np.array([b""], dtype=np.object_)},
        )
    assert metric_value(_wait_pools_empty(mm_server), "mm_pool_blocks_used", model="mm_encoder") == 0


# ---- bad input: clear errors, server stays healthy, nothing leaks ---------------------------
def _infer_raw(server, image_list, prompt=b"Describe", max_tokens=None, dtype=np.int32):
    client = httpclient.InferenceServerClient(server.http_address, network_timeout=120)
    inputs = []
    img = httpclient.InferInput("IMAGE", [len(image_list)], "BYTES")
    img.set_data_from_numpy(np.array(image_list, dtype=np.object_).reshape(len(image_list)))
    inputs.append(img)
    p = httpclient.InferInput("PROMPT", [1], "BYTES")
    p.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    inputs.append(p)
    if max_tokens is not None:
        mt = httpclient.InferInput("MAX_TOKENS", [1], "INT32")
        mt.set_data_from_numpy(np.array([max_tokens], dtype=dtype))
        inputs.append(mt)
    return client.infer("mm_pipeline", inputs)


@pytest.mark.parametrize(
    "case, message",
    [
        ("corrupt", "IMAGE\\[0\\].*(corrupt|truncated|recognised|format)"),
        ("not_an_image", "IMAGE\\[0\\].*recognised image format"),
        ("aspect_ratio", "IMAGE\\[0\\]: 4x1000 cannot be preprocessed.*aspect ratio"),
        ("empty_prompt", "PROMPT: must not be empty"),
        ("max_tokens_zero", "MAX_TOKENS: must be in \\[1, 1024\\]"),
        ("max_tokens_huge", "MAX_TOKENS: must be in \\[1, 1024\\]"),
        ("second_image_bad", "IMAGE\\[1\\]"),
    ],
)
def test_bad_input_gets_clear_error(mm_server, images, tiny_model_dir, case, message):
    good = images["small"]
    args = {
        "corrupt": dict(image_list=[good[: len(good) // 2]]),
        "not_an_image": dict(image_list=[b"this is not an image"]),
        "aspect_ratio": dict(image_list=[make_test_image(4, 1000)]),  # 250:1; any size is resized
        "empty_prompt": dict(image_list=[good], prompt=b"   "),
        "max_tokens_zero": dict(image_list=[good], max_tokens=0),
        "max_tokens_huge": dict(image_list=[good], max_tokens=2_000_000_000),
        "second_image_bad": dict(image_list=[good, b"\x89PNG\r\n\x1a\n broken"]),
    }[case]
    with pytest.raises(InferenceServerException, match=message) as info:
        _infer_raw(mm_server, **args)
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT", None) or "400" in str(info.value)
    # healthy afterwards, and nothing held by the failed request
    assert httpclient.InferenceServerClient(mm_server.http_address).is_server_ready()
    _infer_raw(mm_server, [good], max_tokens=1)
    m = _wait_pools_empty(mm_server)
    assert metric_value(m, "mm_pool_blocks_used") == 0


def test_wrong_dtype_for_max_tokens_is_rejected_by_triton(mm_server, images):
    client = grpcclient.InferenceServerClient(mm_server.grpc_url)
    img = grpcclient.InferInput("IMAGE", [1], "BYTES")
    img.set_data_from_numpy(np.array([images["small"]], dtype=np.object_))
    p = grpcclient.InferInput("PROMPT", [1], "BYTES")
    p.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    mt = grpcclient.InferInput("MAX_TOKENS", [1], "FP32")
    mt.set_data_from_numpy(np.array([3.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|TYPE_INT32"):
        client.infer("mm_pipeline", [img, p, mt])


def test_repeated_image_hits_the_embedding_cache(mm_server, tiny_model_dir, oracle):
    image = make_test_image(tokens=1800, seed=4242, model_dir=tiny_model_dir)
    before = _metrics(mm_server)
    with MMClient(mm_server.http_url) as client:
        first = client.generate([image], PROMPT, max_tokens=MAX_TOKENS)
        second = client.generate([image, image], PROMPT, max_tokens=MAX_TOKENS)
    assert first.token_ids == oracle([image])
    assert second.token_ids == oracle([image, image])
    after = _wait_pools_empty(mm_server)
    hits = metric_value(after, "mm_embedding_cache_hits_total") - metric_value(before, "mm_embedding_cache_hits_total")
    misses = metric_value(after, "mm_embedding_cache_misses_total") - metric_value(
        before, "mm_embedding_cache_misses_total"
    )
    assert (hits, misses) == (2, 1)
    assert metric_value(after, "mm_pool_blocks_used", model="mm_encoder") == 0
    assert metric_value(after, "mm_pool_blocks_cached", model="mm_encoder") >= 15  # 1800 tokens / 128
