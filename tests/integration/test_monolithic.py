"""mm_monolithic (colocated baseline) through a real tritonserver: same contract, same greedy tokens and
the same input errors as the disaggregated mm_pipeline."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness import metric_value
from mm_bench.images import make_test_image
from mm_client import MMClient

pytestmark = pytest.mark.integration
PROMPT = "Describe the image."
MAX_TOKENS = 6
# tokens wanted, seed: no continuation, one, three (at the default 1024-token window)
IMAGES = {"small": (96, 11), "one_cont": (1500, 12), "three_cont": (4000, 13)}


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def images(tiny_model_dir):
    return {name: make_test_image(tokens=t, seed=s, model_dir=tiny_model_dir) for name, (t, s) in IMAGES.items()}


def _generate(server, model, images, prompt=PROMPT, max_tokens=MAX_TOKENS, protocol="http"):
    url = server.http_url if protocol == "http" else server.grpc_url
    with MMClient(url, protocol=protocol, model=model, timeout_s=300) as client:
        return client.generate(images, prompt, max_tokens=max_tokens)


@pytest.mark.parametrize("name", list(IMAGES))
def test_monolithic_tokens_equal_pipeline(mm_server, images, name):
    mono = _generate(mm_server, "mm_monolithic", [images[name]])
    pipe = _generate(mm_server, "mm_pipeline", [images[name]], protocol="grpc")
    assert len(mono.token_ids) == MAX_TOKENS
    assert mono.token_ids == pipe.token_ids
    assert mono.text == pipe.text


def test_monolithic_several_images_and_default_max_tokens(mm_server, images):
    order = [images["one_cont"], images["small"]]
    assert (
        _generate(mm_server, "mm_monolithic", order).token_ids == _generate(mm_server, "mm_pipeline", order).token_ids
    )
    mono = _generate(mm_server, "mm_monolithic", [images["small"]], "Hi", max_tokens=None)
    pipe = _generate(mm_server, "mm_pipeline", [images["small"]], "Hi", max_tokens=None)
    assert mono.token_ids == pipe.token_ids and len(mono.token_ids) <= 32  # default_max_tokens


def test_monolithic_moves_no_embedding(mm_server, images):
    """The colocated path does no transfer: the mm_ transfer counters do not move."""
    before = metric_value(mm_server.metrics(), "mm_transfers_total", 0.0)
    _generate(mm_server, "mm_monolithic", [images["one_cont"]], max_tokens=1)
    assert metric_value(mm_server.metrics(), "mm_transfers_total", 0.0) == before


def _infer(server, model, image_list, prompt=b"Describe", max_tokens=None):
    client = httpclient.InferenceServerClient(server.http_address, network_timeout=120)
    inputs = []
    if image_list is not None:  # None: a request without IMAGE
        img = httpclient.InferInput("IMAGE", [len(image_list)], "BYTES")
        img.set_data_from_numpy(np.array(image_list, dtype=np.object_).reshape(len(image_list)))
        inputs.append(img)
    p = httpclient.InferInput("PROMPT", [1], "BYTES")
    p.set_data_from_numpy(np.array([prompt], dtype=np.object_))
    inputs.append(p)
    if max_tokens is not None:
        mt = httpclient.InferInput("MAX_TOKENS", [1], "INT32")
        mt.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
        inputs.append(mt)
    return client.infer(model, inputs)


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_an_image", "IMAGE\\[0\\].*recognised image format"),
        ("aspect_ratio", "IMAGE\\[0\\]: 4x1000 cannot be preprocessed.*aspect ratio"),
        ("empty_prompt", "PROMPT: must not be empty"),
        ("max_tokens_zero", "MAX_TOKENS: must be in \\[1, 1024\\]"),
        ("second_image_bad", "IMAGE\\[1\\]"),
        # issue 14: a 10 MB prompt once grew the monolithic stub to 13 GB; now refused from its size, at once
        ("prompt_10MB", "PROMPT: longer than max_prompt_bytes=131072 bytes"),
        ("bomb_header", "IMAGE\\[0\\]: image is .*(more than the allowed|too large to decode safely)"),
        ("no_image", "input IMAGE is required"),
    ],
)
def test_monolithic_bad_input_same_error_as_pipeline(mm_server, images, tiny_model_dir, case, message):
    good = images["small"]
    args = {
        "not_an_image": dict(image_list=[b"this is not an image"]),
        "aspect_ratio": dict(image_list=[make_test_image(4, 1000)]),  # 250:1; any size is resized
        "empty_prompt": dict(image_list=[good], prompt=b"   "),
        "max_tokens_zero": dict(image_list=[good], max_tokens=0),
        "second_image_bad": dict(image_list=[good, b"\x89PNG\r\n\x1a\n broken"]),
        "prompt_10MB": dict(image_list=[good], prompt=b"x" * (10 << 20)),
        "bomb_header": dict(image_list=[_png_header(30000, 30000)]),
        "no_image": dict(image_list=None),
    }[case]
    for model in ("mm_monolithic", "mm_pipeline"):
        start = time.monotonic()
        with pytest.raises(InferenceServerException, match=message) as info:
            _infer(mm_server, model, **args)
        assert "400" in str(info.value.status()) or "invalid input" in str(info.value), (model, info.value)
        if case in ("prompt_10MB", "bomb_header", "no_image"):
            assert time.monotonic() - start < 3, (model, case)
    assert _infer(mm_server, "mm_monolithic", [good], max_tokens=1).as_numpy("TOKEN_IDS").shape == (1,)
