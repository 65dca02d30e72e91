"""Internal-model token (mm_triton.access), trusted encoder endpoints (mm_language.trust) and request bounds
(mm_triton.bounds), without Triton."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from mm_language.trust import TrustedEndpoints
from mm_triton import access
from mm_triton.access import InternalCallRefused, InternalGate, derive_token, per_server_secret, register_endpoint
from mm_triton.bounds import RequestBounds, check_request


class FakeTensor:
    def __init__(self, array):
        self._array = array

    def as_numpy(self):
        return self._array


class FakePb:
    """The two pb_utils calls the checks use; a request is a dict of numpy arrays."""

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return FakeTensor(request[name]) if name in request else None

    @staticmethod
    def Tensor(name, array):  # noqa: N802 - pb_utils' spelling
        return (name, array)


def _obj(*values):
    return np.array(list(values), dtype=np.object_)


# ---- the per-server secret ------------------------------------------------------------------------------------
def test_per_server_secret_is_private_stable_and_new_per_server(tmp_path):
    first = per_server_secret(os.getpid(), base=tmp_path)
    assert len(first) == 64 and per_server_secret(os.getpid(), base=tmp_path) == first
    directory = tmp_path / f"mm-triton-{os.getuid()}"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (key,) = directory.glob("internal-*.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert per_server_secret(other.pid, base=tmp_path) != first  # another server, another secret
    finally:
        other.kill()
        other.wait()


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_text("x" * 64)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        access.server_token(env={access.SECRET_FILE_ENV: str(path)})
    path.chmod(0o600)
    assert access.server_token(env={access.SECRET_FILE_ENV: str(path)}) == "x" * 64


def test_a_directory_others_can_enter_is_refused(tmp_path):
    directory = tmp_path / f"mm-triton-{os.getuid()}"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(PermissionError, match="0700"):
        per_server_secret(os.getpid(), base=tmp_path)


def test_shared_secret_derives_the_same_token_everywhere(monkeypatch):
    assert derive_token("s" * 32) == derive_token("s" * 32) != derive_token("t" * 32)
    assert "s" * 32 not in derive_token("s" * 32)
    monkeypatch.setattr(access, "server_token", lambda env=None: "p" * 64)
    gate = InternalGate.for_model("mm_encoder", {}, "s" * 32)  # the server's own token, or the derived one
    assert gate.allows(FakePb, {"MM_INTERNAL_TOKEN": _obj(b"p" * 64)})
    assert gate.allows(FakePb, {"MM_INTERNAL_TOKEN": _obj(derive_token("s" * 32).encode())})
    assert not gate.allows(FakePb, {"MM_INTERNAL_TOKEN": _obj(derive_token("t" * 32).encode())})


# ---- the gate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_inputs, allowed",
    [
        ({}, False),
        ({"MM_INTERNAL_TOKEN": _obj(b"wrong")}, False),
        ({"MM_INTERNAL_TOKEN": _obj(b"")}, False),
        ({"MM_INTERNAL_TOKEN": _obj(b"a" * 64, b"a" * 64)}, False),
        ({"MM_INTERNAL_TOKEN": np.array([1], dtype=np.int32)}, False),
        ({"MM_INTERNAL_TOKEN": _obj(b"a" * 64)}, True),
    ],
)
def test_gate(request_inputs, allowed):
    gate = InternalGate("mm_encoder", "a" * 64)
    assert gate.allows(FakePb, request_inputs) is allowed
    if not allowed:
        with pytest.raises(InternalCallRefused, match="mm_encoder is an internal model.*mm_pipeline"):
            gate.check(FakePb, request_inputs)


def test_gate_modes(monkeypatch):
    monkeypatch.setattr(access, "server_token", lambda env=None: "p" * 64)
    assert not InternalGate.for_model("m", {"internal_access": "open"}, "").closed
    assert not InternalGate.for_model("m", {"internal_access": "shared_secret"}, "").closed
    assert InternalGate.for_model("m", {"internal_access": "shared_secret"}, "s" * 32).closed
    with pytest.raises(ValueError, match="internal_access"):
        InternalGate.for_model("m", {"internal_access": "sometimes"}, "")


# ---- trusted endpoints ------------------------------------------------------------------------------------------
def _ref(address: str) -> bytes:
    from mmtransfer.wire import PROTOCOL_VERSION

    return (
        '{"transfer_id":"'
        + "ab" * 16
        + '","address":"'
        + address
        + '","num_tokens":4,"version":'
        + str(PROTOCOL_VERSION)
        + "}"
    ).encode()


def test_only_registered_or_configured_endpoints_are_trusted(tmp_path):
    trust = TrustedEndpoints(tmp_path, "10.0.0.5:*,enc:9000")
    register_endpoint("tcp://127.0.0.1:5555", tmp_path)
    trust.check([_ref("tcp://127.0.0.1:5555"), _ref("tcp://10.0.0.5:1234"), _ref("tcp://enc:9000")])
    with pytest.raises(ValueError, match=r"EMBED_REF\[1\]: endpoint tcp://127.0.0.1:6666 is not one of"):
        trust.check([_ref("tcp://127.0.0.1:5555"), _ref("tcp://127.0.0.1:6666")])
    assert trust.only_trusted([_ref("tcp://127.0.0.1:6666"), b"{bad", _ref("tcp://enc:9000")]) == [
        _ref("tcp://enc:9000")
    ]
    trust.check([b"{not json"])  # left to the service's parser and its message


def test_a_newly_registered_encoder_is_trusted_after_a_rescan(tmp_path, monkeypatch):
    trust = TrustedEndpoints(tmp_path)
    assert not trust.trusted("tcp://127.0.0.1:7000")
    register_endpoint("tcp://127.0.0.1:7000", tmp_path)  # an encoder restarted on a new port
    assert trust.trusted("tcp://127.0.0.1:7000")


@pytest.mark.parametrize("bad", ["host", "host:port", ":1", "host:-1"])
def test_bad_trusted_encoders_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="trusted_encoders"):
        TrustedEndpoints(tmp_path, bad)


# ---- bounds -----------------------------------------------------------------------------------------------------
INPUTS = ("IMAGE", "PROMPT", "MESSAGES", "MAX_TOKENS")


def _png_header(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR: only the header is read
    data[29:33] = (zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def _req(**inputs):
    base = {"IMAGE": _obj(_png_header(8, 8)), "PROMPT": _obj(b"hi")}
    base.update(inputs)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"IMAGE": None}, "input IMAGE is required"),
        ({"PROMPT": None}, "input PROMPT is required"),
        ({"IMAGE": _obj(*[b"x"] * 17)}, "IMAGE: at most 16 images per request, got 17"),
        ({"IMAGE": _obj(b"x" * 2000)}, r"IMAGE\[0\]: 2000 bytes, more than max_image_bytes=1000"),
        (
            {"IMAGE": _obj(_png_header(8, 8), _png_header(300, 30))},
            r"IMAGE\[1\]: image is 300x30 = 9000 pixels, more than the allowed 4096",
        ),
        ({"IMAGE": _obj(_png_header(30000, 30000))}, r"IMAGE\[0\]: image is too large to decode safely"),
        ({"PROMPT": _obj(b"p" * 501)}, "PROMPT: longer than max_prompt_bytes=500 bytes"),
        ({"PROMPT": None, "MESSAGES": _obj(b"m" * 501)}, "MESSAGES: longer than max_prompt_bytes=500 bytes"),
        ({"MAX_TOKENS": np.array([0], dtype=np.int32)}, r"MAX_TOKENS: must be in \[1, 64\], got 0"),
        ({"IMAGE": _obj(*[b"x" * 900] * 3)}, "request: 2702 bytes of inputs, more than max_request_bytes=2500"),
        ({"IMAGE": np.array([1], dtype=np.int32)}, "input IMAGE must be BYTES"),
    ],
)
def test_bounds_refuse_from_header_facts(inputs, message):
    bounds = RequestBounds(
        max_image_bytes=1000, max_request_bytes=2500, max_image_pixels=4096, max_prompt_bytes=500, max_tokens_limit=64
    )
    with pytest.raises(ValueError, match=message):
        check_request(FakePb, _req(**inputs), bounds, INPUTS)


def test_bounds_accept_a_good_request_and_data_urls():
    import base64

    url = b"data:image/png;base64," + base64.b64encode(_png_header(8, 8))
    check_request(FakePb, _req(IMAGE=_obj(url), MAX_TOKENS=np.array([4], dtype=np.int32)), RequestBounds(), INPUTS)
    big = b"data:image/png;base64," + base64.b64encode(_png_header(9000, 9000))
    with pytest.raises(ValueError, match="9000x9000"):
        check_request(FakePb, _req(IMAGE=_obj(big)), RequestBounds(), INPUTS)


def test_bounds_config_is_validated():
    with pytest.raises(ValueError, match="max_image_bytes"):
        RequestBounds(max_image_bytes=0)
