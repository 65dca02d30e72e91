"""Reliability pieces without a server: error codes at the Triton boundary, cancellation checks, the
receiver's cancellation path, the encoder's request-level capacity check, and the stub watchdog's view of
a process tree (processes named like Triton's stubs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from mm_triton.errors import error_code_name, triton_error
from mm_triton.model_base import ModelBase
from mmtransfer import (
    AuthenticationError,
    BlockPool,
    ChannelError,
    PoolExhausted,
    ProtocolError,
    Receiver,
    RemoteError,
    RequestTooLarge,
    SenderEndpoint,
    SocketsExhausted,
    TransferCancelled,
    TransferConfig,
    TransferExpired,
    TransferInUse,
    TransferNotFound,
    TransferTimeout,
)


# ---- error codes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc, code, prefix",
    [
        (PoolExhausted("p exhausted"), "UNAVAILABLE", "unavailable (pool_exhausted)"),
        (TransferTimeout("slow"), "UNAVAILABLE", "unavailable (timeout)"),
        (TransferNotFound("gone"), "UNAVAILABLE", "unavailable (not_found)"),
        (TransferExpired("ttl"), "UNAVAILABLE", "unavailable (expired)"),
        (AuthenticationError("mac"), "UNAVAILABLE", "unavailable (auth)"),
        (ChannelError("nccl broke"), "UNAVAILABLE", "unavailable (channel)"),
        (TransferInUse("another receiver"), "UNAVAILABLE", "unavailable (in_use)"),
        (SocketsExhausted("all in use"), "UNAVAILABLE", "unavailable (sockets)"),
        (TransferCancelled("bye"), "CANCELLED", "cancelled"),
        (RequestTooLarge("big"), "INVALID_ARG", "invalid input"),
        (ValueError("IMAGE[0]: bad"), "INVALID_ARG", "invalid input"),
        (ProtocolError("bad frame"), "INVALID_ARG", "invalid input"),  # a ValueError: only from bad EMBED_REFs here
        (RemoteError("internal", "boom"), "INTERNAL", "transfer failed (remote)"),
        (RuntimeError("bug"), "INTERNAL", "internal error (RuntimeError)"),
    ],
)
def test_error_codes(exc, code, prefix):
    assert error_code_name(exc) == (code, prefix)


class _FakeTritonError:
    UNAVAILABLE, INVALID_ARG, INTERNAL, CANCELLED = 14, 3, 13, 1

    def __init__(self, message, code=None):
        self.message, self.code = message, code


def test_triton_error_message_names_the_cause():
    err = triton_error(SimpleNamespace(TritonError=_FakeTritonError), PoolExhausted("enc-pool exhausted: no 3 free"))
    assert err.code == 14 and err.message == "unavailable (pool_exhausted): enc-pool exhausted: no 3 free"

    class NoCancelled:  # an older backend without the CANCELLED code
        UNAVAILABLE = 14

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    err = triton_error(SimpleNamespace(TritonError=NoCancelled), TransferCancelled("x"))
    assert err.code == 14 and err.message.startswith("cancelled")


# ---- cancellation checks ------------------------------------------------------------------------------
def test_cancellation_check_is_cached_sticky_and_safe():
    calls = []

    class Request:
        def __init__(self, answers):
            self.answers = answers

        def is_cancelled(self):
            calls.append(1)
            value = self.answers.pop(0)
            if isinstance(value, Exception):
                raise value
            return value

    check = ModelBase.cancellation_check(Request([False, True]), min_interval_s=0.05)
    assert check() is False and check() is False and len(calls) == 1  # cached within the interval
    time.sleep(0.06)
    assert check() is True and check() is True and len(calls) == 2  # sticky once True
    assert ModelBase.cancellation_check(object())() is False  # a backend without the call
    failing = ModelBase.cancellation_check(Request([RuntimeError("ipc")]))
    assert failing() is False  # a failed probe never fails the request


HIDDEN = 8


def test_receiver_gives_up_a_cancelled_transfer_between_continuations():
    cfg = TransferConfig(
        block_tokens=4,
        default_window_tokens=8,
        pool_blocks=4,
        max_embed_tokens=256,
        pull_timeout_s=2,
        alloc_timeout_s=1,
        use_size_hint=False,
        transport="host",  # asked before every PULL; an shm pull copies every chunk at once, asked once
    )
    with (
        SenderEndpoint(BlockPool(64, 4, HIDDEN, name="tx"), cfg) as sender,
        Receiver(BlockPool(4, 4, HIDDEN, name="rx"), cfg) as receiver,
    ):
        asked = []

        def cancelled():
            asked.append(1)
            return len(asked) > 3  # cancelled after three chunks

        ref = sender.register(torch.randn(100, HIDDEN))
        with pytest.raises(TransferCancelled, match="was cancelled"):
            receiver.pull(ref, "req-1", cancelled)
        assert len(asked) == 4 and receiver.pool.used_blocks == 0
        deadline = time.monotonic() + 2
        while sender.active_transfers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.active_transfers == 0 and sender.pool.used_blocks == 0  # ABORTed, not left to the TTL
        # cancelled before anything was asked: nothing pulled at all
        ref = sender.register(torch.randn(10, HIDDEN))
        with pytest.raises(TransferCancelled):
            receiver.pull(ref, "req-2", lambda: True)
        data = torch.randn(30, HIDDEN)
        assert torch.equal(receiver.pull(sender.register(data), "req-3", lambda: False).embedding, data)


def _wait_sender_idle(sender, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sender.active_transfers and time.monotonic() < deadline:
        time.sleep(0.01)


def test_pull_loader_aborts_the_rest_on_cancellation_and_abort():
    """mm_language's ImageLoader: a cancellation during the second pull aborts the third on its sender; abort()
    before load releases every embedding at once; the receive window is freed on every path."""
    from mm_language.loader import PullLoader
    from mmtransfer import EmbedRef

    # host: the cancellation is asked before every PULL, so "during the second pull" is a count of them
    cfg = TransferConfig(
        block_tokens=4, default_window_tokens=8, pool_blocks=8, max_embed_tokens=256, pull_timeout_s=2, transport="host"
    )
    with SenderEndpoint(BlockPool(64, 4, HIDDEN, name="tx"), cfg) as sender:
        receiver = Receiver(BlockPool(8, 4, HIDDEN, name="rx"), cfg)
        try:

            def refs(n):
                return [
                    EmbedRef.from_json(sender.register(torch.randn(10, HIDDEN), {"grid_thw": [1, 2, 20]}).to_json())
                    for _ in range(n)
                ]

            state = {"n": 0}

            def cancelled():  # cancelled while the second image is being pulled
                state["n"] += 1
                return state["n"] > 4

            with pytest.raises(TransferCancelled):
                PullLoader(receiver, refs(3), "r1").load(cancelled)
            _wait_sender_idle(sender)
            assert sender.active_transfers == 0 and receiver.pool.used_blocks == 0
            loader = PullLoader(receiver, refs(2), "r2")
            loader.abort("the request ended before its images were pulled")
            loader.abort("again")  # idempotent
            with pytest.raises(TransferCancelled, match="aborted"):
                loader.load(lambda: False)
            _wait_sender_idle(sender)
            assert sender.active_transfers == 0
            data = torch.randn(10, HIDDEN)
            ok = PullLoader(
                receiver, [EmbedRef.from_json(sender.register(data, {"grid_thw": [1, 2, 20]}).to_json())], "r3"
            )
            images = ok.load(lambda: False)
            assert torch.equal(images[0].embeds, data) and images[0].grid_thw == (1, 2, 20)
            lying = EmbedRef.from_json(sender.register(torch.randn(10, HIDDEN), {"grid_thw": [1, 2, 20]}).to_json())
            lying = EmbedRef(lying.transfer_id, lying.address, 12)
            with pytest.raises(ProtocolError, match="10 tokens, its EMBED_REF said 12"):
                PullLoader(receiver, [lying], "r4").load(lambda: False)
            assert receiver.pool.used_blocks == 0
        finally:
            receiver.close()


# ---- the encoder's request-level capacity check ---------------------------------------------------------
def _encoder(pool_blocks: int, block_allocator: bool = True):
    from mm_encoder.service import EncoderService

    svc = EncoderService.__new__(EncoderService)
    svc.config = TransferConfig(
        pool_blocks=pool_blocks, block_tokens=128, max_embed_tokens=2048, use_block_allocator=block_allocator
    )
    svc.pool = BlockPool(pool_blocks, 128, 4, block_allocator=block_allocator, slot_blocks=16, name="enc")
    return svc


def test_a_request_that_can_never_fit_the_encoder_pool_is_refused_at_once():
    svc = _encoder(32)
    svc._check_fits([(1000, "a"), (1000, "b"), (1000, "c")])  # 8 + 8 + 8 = 24 blocks: fits
    svc._check_fits([(2000, "a")] * 5)  # the same image five times (cached): 16 blocks
    with pytest.raises(RequestTooLarge, match="need 48 blocks.*whole pool \\(pool_blocks=32\\)"):
        svc._check_fits([(2000, "a"), (2000, "b"), (2000, "c")])
    slots = _encoder(32, block_allocator=False)  # 2 fixed slots of 16 blocks
    slots._check_fits([(10, "a"), (10, "b")])
    with pytest.raises(RequestTooLarge, match="fixed slots"):
        slots._check_fits([(10, "a"), (10, "b"), (10, "c")])


# ---- the stub watchdog's view of a process tree ---------------------------------------------------------
def test_watchdog_finds_stubs_by_parent_and_reloads_the_model_of_a_dead_one(tmp_path, monkeypatch):
    from mm_triton import watchdog

    # a "server" process whose children are named like Triton's stubs, with their argument layout; each runs its
    # "model.py" (a script that sleeps)
    for model in ("mm_encoder", "mm_language"):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / "model.py").write_text("import time\ntime.sleep(60)\n")
    child = (
        "import os, sys, time\n"
        "for inst, model in (('mm_encoder_0_0', 'mm_encoder'), ('mm_language_0_0', 'mm_language')):\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, ['/x/triton_python_backend_stub', f'{tmp_path}/{{model}}/1/model.py',\n"
        "                 'shm', '1', '1', '1', '/b', '336', inst, 'DEFAULT'])\n"
        "time.sleep(60)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 10
        while len(watchdog.list_stubs(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stubs = watchdog.list_stubs(server.pid)
        assert sorted((s.model, s.instance) for s in stubs.values()) == [
            ("mm_encoder", "mm_encoder_0_0"),
            ("mm_language", "mm_language_0_0"),
        ]
        dog = watchdog.StubWatchdog(server.pid, "127.0.0.1:1", "t" * 16)
        calls = []
        monkeypatch.setattr(dog, "_repository_call", lambda model, op: calls.append((model, op)))
        monkeypatch.setattr(dog, "_model_ready", lambda model: False)
        dog._known = stubs
        assert dog.check_once() == []  # all alive
        victim = next(s for s in stubs.values() if s.model == "mm_language")
        os.kill(victim.pid, 9)
        deadline = time.monotonic() + 5
        while watchdog.alive(victim) and time.monotonic() < deadline:
            time.sleep(0.02)
        restarts = dog.check_once()
        assert [(r.model, r.instance, r.ok) for r in restarts] == [("mm_language", "mm_language_0_0", True)]
        assert calls == [("mm_language", "unload"), ("mm_language", "load")]
        assert dog.check_once() == []  # not twice
    finally:
        for s in watchdog.list_stubs(server.pid).values():
            os.kill(s.pid, 9)
        server.kill()
        server.wait()


def test_watchdog_server_args_close_repository_and_shared_memory_apis():
    """The default: closed by a header value with a newline (no client can send it), nothing to keep secret."""
    from mm_triton.watchdog import CLOSED_HEADER, server_args

    args = server_args(None, ["mm_pipeline", "mm_control"])
    assert args[:3] == ["--model-control-mode=explicit", "--load-model=mm_pipeline", "--load-model=mm_control"]
    closed = [a for a in args if "restricted" in a]
    assert len(closed) == 2 and all("model-repository,shared-memory:" + CLOSED_HEADER + "=" in a for a in closed)
    assert all(a.endswith("\n") for a in closed)
    assert server_args(None) != server_args(None)  # a new value every start


def test_watchdog_server_args_restrict_the_repository_api():
    from mm_triton.watchdog import HEADER, server_args

    args = server_args("0123456789abcdef")
    assert "--model-control-mode=explicit" in args and "--load-model=*" in args
    assert f"--http-restricted-api=model-repository:{HEADER}=0123456789abcdef" in args
    assert f"--grpc-restricted-protocol=model-repository:{HEADER}=0123456789abcdef" in args
    assert any(a.startswith("--http-restricted-api=shared-memory:") for a in args)
    for bad in ("short", "has,comma-0123456789", "a:b=c-0123456789abc"):
        with pytest.raises(ValueError):
            server_args(bad)


def test_soak_classifies_server_messages():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "soak_under_test", Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
    )
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak_under_test"] = soak
    spec.loader.exec_module(soak)
    assert soak.classify("[StatusCode.UNAVAILABLE] unavailable (pool_exhausted): p exhausted") == "pool_exhausted"
    assert soak.classify("[400] invalid input: IMAGE[0]: not in a recognised image format") == "invalid_input"
    assert soak.classify("[StatusCode.INTERNAL] Stub process 'mm_encoder_0_0' is not healthy.") == "stub_dead"
    assert soak.classify("[StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded") == "deadline"
    assert soak.classify("[StatusCode.UNAVAILABLE] unavailable (expired): transfer x: reclaimed") == "expired"
    assert soak.classify("something new") == "other"
    assert abs(sum(soak.DEFAULT_MIX.values()) - 1.0) < 1e-9 and set(soak.DEFAULT_MIX) == set(soak.KINDS)
