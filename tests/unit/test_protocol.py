"""Wire encoding: round trips, bounds, and a decoder that only ever raises ProtocolError."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtransfer import EmbedRef, ProtocolError, wire
from mmtransfer.ref import new_transfer_id

TID = new_transfer_id()
AUX = wire.Aux(total_tokens=2000, hidden=64, dtype="bfloat16", extras={"grid_thw": [1, 40, 50]})
MESSAGES = [
    wire.Pull(TID, 0, 0, 1024, "host", "req-1"),
    wire.Chunk(TID, 0, 0, 1024, 2000, AUX),
    wire.Chunk(TID, 1, 1024, 976, 2000, None),
    wire.Done(TID, 2),
    wire.Ack(TID, 2),
    wire.Abort(TID, "client cancelled"),
    wire.Error("", 0, wire.ErrorCode.BAD_REQUEST, "bad"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg):
    assert wire.decode(wire.encode(msg)) == msg


def test_transfer_states_are_ordered():
    S = wire.TransferState
    assert S.FAILED < S.BOOTSTRAPPING < S.WAITING_FOR_INPUT < S.TRANSFERRING < S.SUCCESS


def _frame(type_: int, body, version=wire.PROTOCOL_VERSION, magic=wire.MAGIC) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack("!4sBB", magic, version, type_) + raw


GOOD_PULL = {
    "transfer_id": TID,
    "seq": 0,
    "sent_tokens": 0,
    "capacity_tokens": 8,
    "transport": "host",
    "request_id": "",
}


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"", "truncated"),
        (_frame(1, GOOD_PULL, magic=b"XXXX"), "magic"),
        (_frame(1, GOOD_PULL, version=9), "version 9"),
        (_frame(77, GOOD_PULL), "unknown message type"),
        (_frame(1, b"{not json"), "not valid JSON"),
        (_frame(1, b"[" * 30000 + b"]" * 30000), "not valid JSON"),
        (_frame(1, {**GOOD_PULL, "sent_tokens": -1}), "sent_tokens"),
        (_frame(1, {**GOOD_PULL, "capacity_tokens": 0}), "capacity_tokens"),
        (_frame(1, {**GOOD_PULL, "capacity_tokens": 1 << 40}), "capacity_tokens"),
        (_frame(1, {**GOOD_PULL, "seq": True}), "seq"),
        (_frame(1, {**GOOD_PULL, "transfer_id": "ABC"}), "128-bit id"),
        (_frame(1, {**GOOD_PULL, "extra": 1}), "exactly the fields"),
        (_frame(1, {k: v for k, v in GOOD_PULL.items() if k != "seq"}), "exactly the fields"),
        (_frame(1, {**GOOD_PULL, "request_id": "\x00evil"}), "request_id"),
        (
            _frame(
                2,
                {
                    "transfer_id": TID,
                    "seq": 0,
                    "offset": 0,
                    "num_tokens": 1,
                    "total_tokens": 1,
                    "aux": {"total_tokens": 1, "hidden": 1, "dtype": "float32", "extras": {"k": list(range(100))}},
                },
            ),
            "extras",
        ),
        (_frame(6, {"transfer_id": "", "seq": 0, "code": "nope", "message": ""}), "error code"),
        (b"MMTX\x01\x01" + b" " * (wire.MAX_FRAME_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_frames_are_rejected_clearly(frame, message):
    with pytest.raises(ProtocolError, match=message):
        wire.decode(frame)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_protocol_error(data):
    try:
        wire.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_mutated_frames_only_raise_protocol_error(msg, data):
    frame = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        wire.decode(bytes(frame[:cut]))
    except ProtocolError:
        pass


# ---- continuation math -------------------------------------------------------------------
WINDOW = 1024


@pytest.mark.parametrize(
    "total, continuations",
    [
        (1, 0),
        (WINDOW - 1, 0),
        (WINDOW, 0),
        (WINDOW + 1, 1),
        (2 * WINDOW, 1),
        (2 * WINDOW + 1, 2),
        (50 * WINDOW, 49),
        (50 * WINDOW + 7, 50),
    ],
)
def test_continuation_count(total, continuations):
    assert len(wire.chunk_plan(total, WINDOW)) - 1 == continuations


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 50 * WINDOW), capacity=st.integers(1, 4 * WINDOW))
def test_chunk_plan_covers_every_token_once_in_order(total, capacity):
    plan = wire.chunk_plan(total, capacity)
    assert plan[0][0] == 0
    assert all(n <= capacity and n >= 1 for _, n in plan)
    assert all(a + n == b for (a, n), (b, _) in zip(plan, plan[1:]))
    assert plan[-1][0] + plan[-1][1] == total
    assert len(plan) == -(-total // capacity)
    assert all(n == capacity for _, n in plan[:-1])  # only the last chunk may be short


def test_no_chunk_past_the_end():
    with pytest.raises(ValueError):
        wire.chunk_tokens(10, 10, 4)


# ---- EMBED_REF ---------------------------------------------------------------------------
def test_embed_ref_roundtrip_and_ids_are_random():
    ref = EmbedRef(new_transfer_id(), "tcp://127.0.0.1:5555", 1234)
    assert EmbedRef.from_json(ref.to_json()) == ref
    assert EmbedRef.from_json(ref.to_json().encode()) == ref
    assert len({new_transfer_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        "{}",
        '{"transfer_id":"x","address":"tcp://a:1","num_tokens":0,"version":1}',
        json.dumps({"transfer_id": TID, "address": "ipc:///tmp/x", "num_tokens": 0, "version": 1}),
        json.dumps({"transfer_id": TID, "address": "tcp://a:1", "num_tokens": -5, "version": 1}),
        json.dumps({"transfer_id": TID, "address": "tcp://a:1", "num_tokens": 0, "version": 1}),
        "x" * 5000,
    ],
)
def test_bad_embed_refs_are_rejected(text):
    with pytest.raises(ProtocolError, match="EMBED_REF"):
        EmbedRef.from_json(text)
