"""The optional shared secret of the control channel: HMAC-SHA256 over every control frame.

It authenticates peers (a frame without a valid MAC is refused, the endpoint keeps serving); it does
not encrypt. Both ends must hold the same secret; any mismatch is a clear error naming the setting,
and an unauthenticated ABORT cannot free another peer's embedding (only the TTL reclaims it)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from mmtransfer import (
    AuthenticationError,
    BlockPool,
    ConfigError,
    ProtocolError,
    Receiver,
    SenderEndpoint,
    TransferConfig,
    TransferNotFound,
    wire,
)
from mmtransfer.ref import new_transfer_id

HIDDEN = 16
SECRET = "0123456789abcdef-shared-secret"
KEY = SECRET.encode()


def _cfg(secret: str = "", **kw) -> TransferConfig:
    base = dict(
        block_tokens=8,
        default_window_tokens=32,
        max_embed_tokens=512,
        pool_blocks=8,
        alloc_timeout_s=0.5,
        pull_timeout_s=2.0,
        pull_wait_s=0.3,
        ttl_s=30.0,
        shared_secret=secret,
    )
    base.update(kw)
    return TransferConfig(**base)


def _pair(sender_secret: str, receiver_secret: str, **kw):
    sender = SenderEndpoint(BlockPool(64, 8, HIDDEN, name="tx"), _cfg(sender_secret, **kw), name="auth-tx")
    receiver = Receiver(BlockPool(8, 8, HIDDEN, name="rx"), _cfg(receiver_secret, **kw), name="auth-rx")
    return sender, receiver


def _eventually(cond, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- configuration -------------------------------------------------------------------------------------
def test_secret_is_optional_validated_and_never_printed():
    assert TransferConfig().shared_secret == "" and TransferConfig().auth_key is None
    cfg = TransferConfig.from_mapping({}, env={"MM_SHARED_SECRET": SECRET})
    assert cfg.auth_key == KEY
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert TransferConfig.from_mapping({"shared_secret": SECRET}, env={}).shared_secret == SECRET
    for bad in ("short", "has a space in it 123", "x" * 5000, "tab\tinside-the-secret"):
        with pytest.raises(ConfigError, match="shared_secret") as info:
            TransferConfig(shared_secret=bad)
        assert bad not in str(info.value)  # the error never echoes the secret


# ---- the frame format ---------------------------------------------------------------------------------
MESSAGES = [
    wire.Pull(new_transfer_id(), 0, 0, 8, "host", "r"),
    wire.Done(new_transfer_id(), 1),
    wire.Abort(new_transfer_id(), "x"),
    wire.Error("", 0, "bad_request", "no"),
    wire.Bootstrap(new_transfer_id(), "auto", "cuda", "G", "h", 1),
    wire.Close(new_transfer_id(), "c"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_authenticated_frames_round_trip_and_carry_a_mac(msg):
    frame = wire.encode(msg, KEY)
    assert frame[5] & wire.AUTH_FLAG and len(frame) == len(wire.encode(msg)) + wire.MAC_BYTES
    assert wire.decode(frame, KEY) == msg
    assert frame[6 : -wire.MAC_BYTES] == wire.encode(msg)[6:]  # the body is readable: no encryption


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_mismatch_is_an_authentication_error(msg):
    plain, signed = wire.encode(msg), wire.encode(msg, KEY)
    with pytest.raises(AuthenticationError, match="requires the shared secret"):
        wire.decode(plain, KEY)
    with pytest.raises(AuthenticationError, match="this endpoint has none"):
        wire.decode(signed)
    with pytest.raises(AuthenticationError, match="does not verify"):
        wire.decode(signed, b"another-secret-of-16+")
    for i in range(len(signed)):  # any single flipped bit, header, body or MAC
        tampered = bytearray(signed)
        tampered[i] ^= 0x01
        with pytest.raises(ProtocolError):
            wire.decode(bytes(tampered), KEY)
    for cut in range(len(signed)):
        with pytest.raises(ProtocolError):
            wire.decode(signed[:cut], KEY)


def test_a_forged_frame_with_the_flag_but_no_valid_mac():
    body = wire.encode(MESSAGES[0])[6:]
    forged = wire.MAGIC + bytes([wire.PROTOCOL_VERSION, int(wire.MsgType.PULL) | wire.AUTH_FLAG]) + body + b"\0" * 32
    with pytest.raises(AuthenticationError, match="does not verify"):
        wire.decode(forged, KEY)


# ---- live endpoints -------------------------------------------------------------------------------------
def test_transfer_with_the_same_secret_on_both_sides():
    sender, receiver = _pair(SECRET, SECRET)
    try:
        data = torch.randn(70, HIDDEN)
        got = receiver.pull(sender.register(data))
        assert torch.equal(got.embedding, data) and got.record.continuations == 2
        assert _eventually(lambda: sender.pool.used_blocks == 0) and receiver.pool.used_blocks == 0
    finally:
        receiver.close()
        sender.close()


def test_unauthenticated_peer_is_refused_and_the_endpoint_keeps_serving():
    sender, receiver = _pair(SECRET, SECRET)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sender.address)
    try:
        data = torch.randn(20, HIDDEN)
        ref = sender.register(data)
        # the right transfer id is not enough without the secret: no bytes, an ERROR it cannot even verify
        sock.send(wire.encode(wire.Pull(ref.transfer_id, 0, 0, 32, "host", "thief")))
        assert sock.poll(2000)
        frames = sock.recv_multipart()
        assert len(frames) == 1  # no chunk bytes
        reply = wire.decode(frames[0], KEY)
        assert isinstance(reply, wire.Error) and reply.code == "unauthenticated"
        with pytest.raises(AuthenticationError):
            wire.decode(frames[0])
        # nor can it abort someone else's transfer
        sock.send(wire.encode(wire.Abort(ref.transfer_id, "vandal")))
        assert sock.poll(2000) and wire.decode(sock.recv_multipart()[0], KEY).code == "unauthenticated"
        # a wrong secret fares no better
        sock.send(wire.encode(wire.Pull(ref.transfer_id, 0, 0, 32, "host", ""), b"wrong-secret-but-long"))
        assert sock.poll(2000) and wire.decode(sock.recv_multipart()[0], KEY).code == "unauthenticated"
        assert sender.rejected_frames == 3
        assert torch.equal(receiver.pull(ref).embedding, data)  # the real receiver still gets it
    finally:
        sock.close()
        ctx.term()
        receiver.close()
        sender.close()


@pytest.mark.parametrize(
    "sender_secret, receiver_secret, message",
    [
        (SECRET, "", "shared_secret"),
        ("", SECRET, "requires the shared secret"),
        (SECRET, "a-different-secret-123", "does not verify|refused"),
    ],
)
def test_mismatched_secrets_fail_clearly_and_ttl_reclaims(sender_secret, receiver_secret, message):
    sender, receiver = _pair(sender_secret, receiver_secret, ttl_s=0.5)
    try:
        ref = sender.register(torch.randn(20, HIDDEN))
        with pytest.raises(AuthenticationError, match=message) as info:
            receiver.pull(ref)
        assert info.value.cause == "auth"
        assert receiver.pool.used_blocks == 0
        # the receiver's ABORT is not authentic to the sender either: only the TTL frees the blocks
        assert _eventually(lambda: sender.pool.used_blocks == 0, 5.0)
    finally:
        receiver.close()
        sender.close()


def test_gpu_channel_bootstrap_is_authenticated_too(monkeypatch):
    """BOOTSTRAP carries the NCCL unique id / CUDA IPC handle: with a secret it is authenticated like any frame."""
    import mmtransfer.device as mcuda
    from mmtransfer.device import DeviceInfo

    host = mcuda.host_id()
    sender, receiver = _pair(SECRET, SECRET)
    sender.server.device_info = DeviceInfo("cpu", "", host)
    monkeypatch.setattr(mcuda, "device_info", lambda device: DeviceInfo("cuda", "GPU-r", host))
    monkeypatch.setattr(Receiver, "uses_channels", property(lambda self: True))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sender.address)
    try:
        data = torch.randn(33, HIDDEN)
        got = receiver.pull(sender.register(data))  # bootstraps (authenticated), negotiates host
        assert torch.equal(got.embedding, data)
        sock.send(wire.encode(wire.Bootstrap(new_transfer_id(), "auto", "cuda", "G", host, 1)))
        assert sock.poll(2000) and wire.decode(sock.recv_multipart()[0], KEY).code == "unauthenticated"
    finally:
        sock.close()
        ctx.term()
        receiver.close()
        sender.close()


def test_unknown_id_with_the_secret_is_still_not_found():
    sender, receiver = _pair(SECRET, SECRET)
    try:
        from mmtransfer import EmbedRef

        with pytest.raises(TransferNotFound):
            receiver.pull(EmbedRef(new_transfer_id(), sender.address, 4))
    finally:
        receiver.close()
        sender.close()
