"""Hostile input at the Triton boundary: mm_pipeline, and mm_encoder / mm_language called directly.

Extends tests/integration/test_pipeline.py (corrupt/not-an-image/empty list/too large/empty prompt/
MAX_TOKENS 0 and 2e9/bad second image/FP32 MAX_TOKENS are there): decompression bombs, huge and
non-image bytes, odd formats, extreme aspect ratios, hostile prompts, extreme MAX_TOKENS, wrong dtypes
and shapes, missing inputs, and forged or malformed EMBED_REFs, including addresses where nobody
answers (bounded by pull_timeout_s). Each gets a clear error of the right kind quickly, no stub process
dies (same pids before and after), nothing leaks, and the server keeps answering correctly.
"""

from __future__ import annotations

import io
import json
import random
import re
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from harness import free_port
from internal import with_token
from mm_bench.images import make_test_image
from mmtransfer.ref import new_transfer_id
from mmtransfer.wire import PROTOCOL_VERSION
from reliability import PIPELINE_MODELS, ReliableServer, error_text, pipeline_inputs, tensors

pytestmark = pytest.mark.integration
PULL_TIMEOUT_S, TTL_S = 2.0, 5.0
TRUSTED_HOST = "127.0.0.2"  # trusted_encoders of this module's server: the pull-timeout cases live there
INVALID = ("400", "StatusCode.INVALID_ARGUMENT")


@pytest.fixture(scope="module")
def rs():
    from conftest import LOG_DIR

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = {
        "MM_PULL_TIMEOUT_S": str(PULL_TIMEOUT_S),
        "MM_TTL_S": str(TTL_S),
        "MM_POOL_BLOCKS": "128",
        "MM_TRUSTED_ENCODERS": f"{TRUSTED_HOST}:*",
    }
    models = PIPELINE_MODELS + ("mm_language_stream", "mm_pipeline_stream")
    with ReliableServer(env=env, models=models, log_file=LOG_DIR / "test_hostile_input-server.log") as server:
        server.start_pids = server.stubs()
        yield server
        assert server.stubs() == server.start_pids, "a stub process died during the module"
        assert server.watchdog.restarts == []


@pytest.fixture(scope="module")
def good():
    return make_test_image(tokens=96, seed=11)


def _png(width: int, height: int, mode: str = "RGB", fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color=0 if mode in ("L", "I;16", "1", "P") else None).save(buf, fmt, **save)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A small, valid-looking PNG that declares width x height: the classic decompression bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)  # a few rows of zeros; the rest would decompress from nothing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _http(
    rs,
    model: str,
    inputs: dict[str, np.ndarray],
    dtypes: dict[str, str] | None = None,
    timeout_s: float = 60,
    token: bool = True,
) -> httpclient.InferResult:
    inputs = with_token(rs, model, inputs) if token else inputs  # white-box calls of the internal models
    client = httpclient.InferenceServerClient(rs.http_address, network_timeout=timeout_s, connection_timeout=timeout_s)
    try:
        return client.infer(model, tensors(httpclient, inputs, dtypes))
    finally:
        client.close()


def _grpc(rs, model: str, inputs: dict[str, np.ndarray], dtypes: dict[str, str] | None = None, token: bool = True):
    inputs = with_token(rs, model, inputs) if token else inputs
    client = grpcclient.InferenceServerClient(rs.grpc_url)
    try:
        return client.infer(model, tensors(grpcclient, inputs, dtypes), client_timeout=60)
    finally:
        client.close()


def _refused(call, *args, match: str, status=INVALID, within_s: float = 5.0, **kw) -> str:
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kw)
    elapsed = time.monotonic() - start
    text = error_text(info.value)
    import re

    assert re.search(match, text), text
    if status:
        assert any(s in text for s in status), text
    assert elapsed < within_s, f"took {elapsed:.1f}s: {text}"
    return text


def _still_fine(rs, good) -> None:
    assert rs.stubs() == rs.start_pids, "a stub process died"
    assert rs.wait_pools_empty(3) == {}, "blocks held after a refused request"


def _junk(n: int, seed: int) -> bytes:
    """Random bytes, the same every run (random junk can also parse as a header declaring a huge image)."""
    return random.Random(seed).randbytes(n)


# ---- images ------------------------------------------------------------------------------------------
IMAGE_CASES = {
    # name: (bytes, expected message)
    "bomb_header_30000x30000": (
        lambda: _png_header_only(30000, 30000),
        "too large to decode safely|more than the allowed",
    ),
    "bomb_header_66000x1": (lambda: _png_header_only(66000, 1000), "too large|more than the allowed"),
    "bomb_real_8001x8000_png": (lambda: _png(8001, 8000), "more than the allowed 64000000"),
    "empty_bytes": (lambda: b"", "empty \\(0 bytes\\)"),
    "random_20MiB": (lambda: _junk(20 << 20, 1), "not in a recognised image format"),
    "png_magic_then_junk": (lambda: b"\x89PNG\r\n\x1a\n" + _junk(5000, 2), "corrupt|truncated|recognised|too large"),
    "truncated_jpeg": (lambda: make_test_image(tokens=400, seed=3, fmt="JPEG")[:700], "truncated|corrupt"),
    "zero_height_header": (lambda: _png_header_only(64, 0), "corrupt|empty size|recognised"),
    "aspect_ratio_1x1000": (lambda: _png(1, 1000), "aspect ratio"),
    "gif_junk": (lambda: b"GIF89a" + _junk(100, 3), "corrupt|truncated|recognised|too large|embedding tokens"),
    "text": (lambda: "Ünïcödé text, not an image".encode(), "not in a recognised image format"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_hostile_images_get_a_clear_invalid_arg(rs, good, case):
    make, message = IMAGE_CASES[case]
    data = make()
    _refused(_http, rs, "mm_pipeline", pipeline_inputs([data]), match=f"IMAGE\\[0\\].*({message})", within_s=10)
    # and with a good image before it: the whole request is refused, the good one not left published
    _refused(_grpc, rs, "mm_pipeline", pipeline_inputs([good, data]), match=f"IMAGE\\[1\\].*({message})", within_s=10)
    _still_fine(rs, good)


def test_odd_but_valid_images_are_served(rs, good):
    images = [
        _png(1, 1),
        _png(2, 199),
        _png(64, 48, "L"),
        _png(64, 48, "RGBA"),
        _png(40, 40, "I;16"),
        _png(40, 40, "1"),
        _png(40, 40, "P"),
        _png(48, 32, fmt="GIF"),
        _png(48, 32, fmt="BMP"),
        _png(48, 32, fmt="WEBP"),
        _png(48, 32, fmt="TIFF"),
        make_test_image(tokens=64, seed=2, fmt="JPEG"),
    ]
    for data in images:
        out = _grpc(rs, "mm_pipeline", pipeline_inputs([data], max_tokens=1))
        assert out.as_numpy("TOKEN_IDS").shape == (1,)
    _still_fine(rs, good)


def test_too_many_images_and_too_many_tokens_together(rs, good):
    _refused(_http, rs, "mm_pipeline", pipeline_inputs([good] * 17), match="at most 16 images")
    # 4096 tokens (the tiny model's cap) = 32 blocks each; 5 distinct ones need 160 > 128 blocks
    bigs = [make_test_image(tokens=4096, seed=s) for s in (9, 10, 11, 12, 13)]
    _refused(_http, rs, "mm_pipeline", pipeline_inputs(bigs), match="need 160 blocks.*whole pool")
    _still_fine(rs, good)


# ---- prompts and MAX_TOKENS -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, message",
    [
        (b"\xff\xfe\xfd not utf-8", "PROMPT is not valid UTF-8"),
        (b"look: <|image_pad|><|vision_start|>", "reserved vision token"),
        (b"x" * (200 * 1024), "max_prompt_bytes"),
        (b"\t\n  \r\n", "PROMPT: must not be empty"),
    ],
)
def test_hostile_prompts(rs, good, prompt, message):
    _refused(_http, rs, "mm_pipeline", pipeline_inputs([good], prompt=prompt), match=message)
    _still_fine(rs, good)


def test_unusual_prompts_that_are_fine(rs, good):
    for prompt in (
        b"nul\0inside",
        "emoji 😀 and ünïcode".encode(),
        b"<|im_end|> <|im_start|>system",
        ("long " * 2000).encode(),
    ):
        out = _grpc(rs, "mm_pipeline", pipeline_inputs([good], prompt=prompt, max_tokens=1))
        assert out.as_numpy("TOKEN_IDS").shape == (1,)
    _still_fine(rs, good)


@pytest.mark.parametrize("max_tokens", [-1, -(2**31), 2**31 - 1, 1025])
def test_extreme_max_tokens(rs, good, max_tokens):
    _refused(
        _grpc,
        rs,
        "mm_pipeline",
        pipeline_inputs([good], max_tokens=max_tokens),
        match=r"MAX_TOKENS: must be in \[1, 1024\]",
    )
    _still_fine(rs, good)


# ---- dtypes, shapes, missing inputs (Triton itself refuses most: the model never sees them) ----------
def _pipeline_case(good, case: str) -> tuple[dict, dict]:
    base = pipeline_inputs([good])
    if case == "IMAGE_as_INT32":
        return {**base, "IMAGE": np.array([1, 2, 3], dtype=np.int32)}, {}
    if case == "IMAGE_2d":
        return {**base, "IMAGE": np.array([[good]], dtype=np.object_)}, {}
    if case == "IMAGE_missing":
        return {k: v for k, v in base.items() if k != "IMAGE"}, {}
    if case == "PROMPT_two_elements":
        return {**base, "PROMPT": np.array([b"a", b"b"], dtype=np.object_)}, {}
    if case == "PROMPT_as_FP32":
        return {**base, "PROMPT": np.array([1.5], dtype=np.float32)}, {}
    if case == "PROMPT_missing":
        return {k: v for k, v in base.items() if k != "PROMPT"}, {}
    if case == "MAX_TOKENS_as_INT64":
        return {**base, "MAX_TOKENS": np.array([4], dtype=np.int64)}, {}
    if case == "MAX_TOKENS_two_elements":
        return {**base, "MAX_TOKENS": np.array([4, 5], dtype=np.int32)}, {}
    if case == "MAX_TOKENS_empty":
        return {**base, "MAX_TOKENS": np.zeros((0,), dtype=np.int32)}, {}
    if case == "IMAGE_declared_BYTES_sent_UINT8":
        return {**base, "IMAGE": np.frombuffer(good, dtype=np.uint8)}, {}
    if case == "unknown_input":
        return {**base, "EXTRA": np.array([1], dtype=np.int32)}, {}
    raise KeyError(case)


PIPELINE_SHAPE_CASES = [
    "IMAGE_as_INT32",
    "IMAGE_2d",
    "IMAGE_missing",
    "PROMPT_two_elements",
    "PROMPT_as_FP32",
    "PROMPT_missing",
    "MAX_TOKENS_as_INT64",
    "MAX_TOKENS_two_elements",
    "MAX_TOKENS_empty",
    "IMAGE_declared_BYTES_sent_UINT8",
    "unknown_input",
]


@pytest.mark.parametrize("case", PIPELINE_SHAPE_CASES)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_wrong_dtypes_shapes_and_missing_inputs(rs, good, case, protocol):
    inputs, dtypes = _pipeline_case(good, case)
    name = case.split("_")[0] if case != "unknown_input" else "EXTRA"
    call = _http if protocol == "http" else _grpc
    _refused(
        call,
        rs,
        "mm_pipeline",
        inputs,
        dtypes,
        match=f"(?i){name}|input|shape|data.?type|expected",
        status=INVALID + ("StatusCode.INTERNAL",),
    )
    _still_fine(rs, good)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"IMAGE": np.array([7], dtype=np.int32)}, "(?i)IMAGE|data.?type"),
        ({}, "(?i)IMAGE|input"),
        ({"IMAGE": np.array([[b"a", b"b"]], dtype=np.object_)}, "(?i)IMAGE|shape"),
    ],
)
def test_mm_encoder_called_directly_with_bad_inputs(rs, good, inputs, message):
    _refused(_grpc, rs, "mm_encoder", inputs, match=message, status=INVALID + ("StatusCode.INTERNAL",))
    _still_fine(rs, good)


# ---- forged and malformed EMBED_REFs, against mm_language ------------------------------------------------
def _lang(refs: list[bytes], prompt: bytes = b"Describe") -> dict[str, np.ndarray]:
    return {
        "EMBED_REF": np.array(refs, dtype=np.object_),
        "PROMPT": np.array([prompt], dtype=np.object_),
        "MAX_TOKENS": np.array([1], dtype=np.int32),
    }


def _ref(address: str, tid: str | None = None, **extra) -> bytes:
    obj = {
        "transfer_id": tid or new_transfer_id(),
        "address": address,
        "num_tokens": 96,
        "version": PROTOCOL_VERSION,
        **extra,
    }
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "ref, message",
    [
        (b"{not json", "EMBED_REF\\[0\\].*not valid JSON"),
        (b"", "EMBED_REF\\[0\\]"),
        (_ref("tcp://127.0.0.1:1", version=PROTOCOL_VERSION + 1), "EMBED_REF\\[0\\]"),
        (
            json.dumps(
                {
                    "transfer_id": new_transfer_id(),
                    "address": "tcp://127.0.0.1:1",
                    "num_tokens": 1,
                    "version": PROTOCOL_VERSION - 1,
                }
            ).encode(),
            f"version {PROTOCOL_VERSION - 1}",
        ),
        (_ref("ipc:///tmp/evil"), "address must look like tcp://host:port"),
        (_ref("tcp://127.0.0.1:1", tid="../../etc/passwd"), "transfer_id"),
        (
            json.dumps(
                {
                    "transfer_id": new_transfer_id(),
                    "address": "tcp://a:1",
                    "num_tokens": -1,
                    "version": PROTOCOL_VERSION,
                }
            ).encode(),
            "num_tokens",
        ),
        (b"x" * 4096, "longer than 1 KiB"),
        (b"\xff" * 10, "not UTF-8|EMBED_REF"),
        (b"[" * 500 + b"]" * 500, "EMBED_REF"),
    ],
)
def test_malformed_embed_refs_are_invalid_arg(rs, good, ref, message):
    _refused(_http, rs, "mm_language", _lang([ref]), match=message, within_s=3)
    _still_fine(rs, good)


def _silent_listener(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((host, 0))
    s.listen(4)
    s.settimeout(1.0)
    return s


@pytest.mark.parametrize(
    "where", ["closed_port", "silent_tcp_listener", "triton_http_port", "unresolvable_host", "blackhole_address"]
)
def test_embed_ref_to_a_strangers_endpoint_is_refused_before_any_connection(rs, good, where):
    """mm_language connects only to this server's encoders (and trusted_encoders): any other address in a ref
    is refused at once, and a listener there sees no connection."""
    listener = _silent_listener() if where == "silent_tcp_listener" else None
    try:
        address = {
            "closed_port": lambda: f"tcp://127.0.0.1:{free_port()}",
            "silent_tcp_listener": lambda: f"tcp://127.0.0.1:{listener.getsockname()[1]}",
            "triton_http_port": lambda: f"tcp://127.0.0.1:{rs.http_port}",  # speaks HTTP, not ZeroMQ
            "unresolvable_host": lambda: "tcp://no-such-host.invalid:5555",
            "blackhole_address": lambda: "tcp://192.0.2.1:5555",  # TEST-NET-1: never routed
        }[where]()
        _refused(
            _grpc, rs, "mm_language", _lang([_ref(address)]), match="is not one of this server's encoders", within_s=1.5
        )
        if listener is not None:
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        if listener is not None:
            listener.close()
    _still_fine(rs, good)


@pytest.mark.parametrize("where", ["silent_tcp_listener", "closed_port"])
def test_a_trusted_endpoint_that_never_answers_fails_within_pull_timeout(rs, good, where):
    """An endpoint the server trusts (MM_TRUSTED_ENCODERS=127.0.0.2:* here) but that never answers: the pull
    gives up after pull_timeout_s."""
    listener = _silent_listener(TRUSTED_HOST) if where == "silent_tcp_listener" else None
    try:
        port = listener.getsockname()[1] if listener is not None else free_port(TRUSTED_HOST)
        text = _refused(
            _grpc,
            rs,
            "mm_language",
            _lang([_ref(f"tcp://{TRUSTED_HOST}:{port}")]),
            match=r"unavailable \(timeout\).*no answer",
            status=("StatusCode.UNAVAILABLE",),
            within_s=PULL_TIMEOUT_S + 3,
        )
        assert "2.0s" in text
    finally:
        if listener is not None:
            listener.close()
    _still_fine(rs, good)


def test_forged_transfer_ids_at_a_real_encoder_and_too_many_refs(rs, good):
    real = _grpc(rs, "mm_encoder", {"IMAGE": np.array([good], dtype=np.object_)}).as_numpy("EMBED_REF")[0]
    address = json.loads(real)["address"]
    _refused(
        _grpc,
        rs,
        "mm_language",
        _lang([_ref(address)]),
        match=r"unavailable \(not_found\).*unknown transfer id",
        status=("StatusCode.UNAVAILABLE",),
        within_s=3,
    )
    # 17 refs: refused before any pull, and the real one is aborted (freed now, not after the TTL)
    _refused(_grpc, rs, "mm_language", _lang([real] + [_ref(address)] * 16), match="at most 16")
    assert rs.wait_pools_empty(2) == {}
    # the real ref was dropped by that abort: using it now is a clear not_found
    _refused(_grpc, rs, "mm_language", _lang([real]), match=r"not_found.*dropped", status=("StatusCode.UNAVAILABLE",))
    # a valid ref followed by a bad one: nothing pulled, the valid one aborted
    real = _grpc(rs, "mm_encoder", {"IMAGE": np.array([good], dtype=np.object_)}).as_numpy("EMBED_REF")[0]
    _refused(_grpc, rs, "mm_language", _lang([real, b"{bad"]), match="EMBED_REF\\[1\\]")
    # the 3000 refs (once "Too many open files"): refused by count, before any is parsed
    _refused(_grpc, rs, "mm_language", _lang([_ref("tcp://192.0.2.1:5555")] * 3000), match="at most 16", within_s=2)
    _still_fine(rs, good)


def _dealer(address: str):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # reads nothing it is not asked to: unread chunks stay in the encoder
    sock.connect(address)
    return sock


def test_an_embedding_serves_one_receiver_and_unread_pulls_do_not_grow_the_encoder(rs, good):
    """Issue 14: a second receiver of an embedding that one is pulling is refused (UNAVAILABLE in_use) and
    cannot end it; 200 PULLs of one id that are never read (once 2 MiB each, bounded by ZeroMQ's 1000
    messages) queue one chunk in the encoder, whose RSS is measured."""
    from mm_triton.procfs import rss_kib
    from mmtransfer import wire

    big = make_test_image(tokens=4000, seed=7)
    real = _grpc(rs, "mm_encoder", {"IMAGE": np.array([big], dtype=np.object_)}).as_numpy("EMBED_REF")[0]
    ref = json.loads(real)
    owner = _dealer(ref["address"])
    try:
        owner.send(wire.encode(wire.Pull(ref["transfer_id"], 0, 0, 1024)))
        assert owner.poll(5000) and isinstance(wire.decode(owner.recv_multipart()[0]), wire.Chunk)
        _refused(
            _grpc, rs, "mm_language", _lang([real]), match=r"unavailable \(in_use\)", status=("StatusCode.UNAVAILABLE",)
        )
        held = {k: v for k, v in rs.pools_used().items() if v}
        assert any("encoder" in k for k in held), f"the refused receiver ended the owner's embedding: {held}"
        encoder = rs.stub_pid("mm_encoder")
        before = rss_kib(encoder)
        for seq in range(1, 201):
            owner.send(wire.encode(wire.Pull(ref["transfer_id"], seq, 0, 1024)))
        time.sleep(2)
        grown_mib = (rss_kib(encoder) - before) / 1024
        print(f"encoder RSS grew {grown_mib:.1f} MiB after 200 unread PULLs")
        assert grown_mib < 16
        owner.send(wire.encode(wire.Abort(ref["transfer_id"], "test done")))
        assert rs.wait_pools_empty(5) == {}
    finally:
        owner.close(linger=0)
    _still_fine(rs, good)


def test_language_inputs_refused_by_triton_leave_only_ttl_work(rs, good):
    """A direct caller whose mm_language request Triton refuses (wrong dtype) never reaches the model: its
    published embedding is reclaimed by the encoder's TTL, and nothing else is held."""
    real = _grpc(rs, "mm_encoder", {"IMAGE": np.array([good], dtype=np.object_)}).as_numpy("EMBED_REF")[0]
    _refused(
        _grpc,
        rs,
        "mm_language",
        {**_lang([real]), "MAX_TOKENS": np.array([1.0], dtype=np.float32)},
        match="(?i)MAX_TOKENS|data.?type",
        status=INVALID + ("StatusCode.INTERNAL",),
    )
    assert rs.wait_pools_empty(TTL_S + 3) == {}
    _still_fine(rs, good)


# ---- internal models: closed to clients ----------------------------------------------------------------
def _stream_error(rs, model: str, inputs: dict[str, np.ndarray]) -> str:
    """The error text of the first response of a streamed (decoupled) call."""
    import queue

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(rs.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put(error))
    try:
        client.async_stream_infer(model, tensors(grpcclient, inputs))
        error = answers.get(timeout=10)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None, f"{model} served a client"
    return error_text(error)


@pytest.mark.parametrize("token", ["missing", "wrong", "empty"])
@pytest.mark.parametrize("model", ["mm_encoder", "mm_language", "mm_language_stream"])
def test_internal_models_refuse_clients_and_allocate_nothing(rs, good, model, token):
    """A client calling an internal model directly (no token, a guessed one, an empty one) gets INVALID_ARG
    naming the public pipeline; the encoder encodes nothing and mm_language connects nowhere: a ref naming a
    listener gets no connection."""
    listener = _silent_listener()
    port = listener.getsockname()[1]
    inputs = (
        {"IMAGE": np.array([good], dtype=np.object_)}
        if model == "mm_encoder"
        else _lang([_ref(f"tcp://127.0.0.1:{port}")] * 3)
    )
    if token != "missing":
        inputs["MM_INTERNAL_TOKEN"] = np.array([b"" if token == "empty" else b"0" * 64], dtype=np.object_)
    encoded = rs.metric("mm_images_encoded_total", model="mm_encoder")
    message = "internal model.*mm_pipeline"
    start = time.monotonic()
    if model == "mm_language_stream":
        text = _stream_error(rs, model, inputs)
        assert re.search(message, text) and "INVALID" in text.upper(), text
    else:
        _refused(_grpc, rs, model, inputs, match=message, within_s=2, token=False)
    assert time.monotonic() - start < 2
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    listener.close()
    assert rs.metric("mm_images_encoded_total", model="mm_encoder") == encoded
    assert all(v == 0 for v in rs.pools_used().values()), rs.pools_used()
    _still_fine(rs, good)


def test_direct_encoder_calls_cannot_exhaust_the_pool(rs, good):
    """The issue's attack: direct mm_encoder calls with large images to hold the pool. Refused, and the
    pipeline keeps serving in the same moment."""
    big = make_test_image(tokens=4000, seed=5)
    for _ in range(8):
        _refused(
            _grpc, rs, "mm_encoder", {"IMAGE": np.array([big], dtype=np.object_)}, match="internal model", token=False
        )
    assert rs.wait_pools_empty(1) == {}
    assert len(_grpc(rs, "mm_pipeline", pipeline_inputs([good], max_tokens=2)).as_numpy("TOKEN_IDS")) == 2


def test_server_still_answers_correctly(rs, good):
    """After everything above: same answer as a fresh request, same stub processes, pools whole."""
    first = _grpc(rs, "mm_pipeline", pipeline_inputs([good], max_tokens=6)).as_numpy("TOKEN_IDS").tolist()
    second = _http(rs, "mm_pipeline", pipeline_inputs([good], max_tokens=6)).as_numpy("TOKEN_IDS").tolist()
    assert first == second and len(first) == 6
    _still_fine(rs, good)
