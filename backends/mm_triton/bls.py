"""Helpers for the models that call other models by BLS (the public pipelines)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# Triton 2.51 hands a BLS caller every error of the called model as INTERNAL; mm_language's errors
# start with the prefix mm_triton.errors gives each code, so that prefix tells the code again.
_PREFIX_CODES = (("invalid input:", "INVALID_ARG"), ("unavailable", "UNAVAILABLE"), ("cancelled", "CANCELLED"))


def code_name(pb: Any, error: Any, message: str) -> str:
    """The name (INVALID_ARG, UNAVAILABLE, ...) of a BLS response's error code; INTERNAL if unknown."""
    name = "INTERNAL"
    try:
        code = error.code()
        for candidate in (
            "INVALID_ARG",
            "UNAVAILABLE",
            "NOT_FOUND",
            "UNSUPPORTED",
            "ALREADY_EXISTS",
            "CANCELLED",
            "INTERNAL",
            "UNKNOWN",
        ):
            if getattr(pb.TritonError, candidate, object()) == code:
                name = candidate
                break
    except Exception:  # noqa: BLE001 - older stubs have no code()
        pass
    if name in ("INTERNAL", "UNKNOWN"):
        for prefix, by_prefix in _PREFIX_CODES:
            if message.startswith(prefix):
                return by_prefix
    return name


# What Triton answers a BLS call while the called model is being reloaded (the watchdog) or its stub is dead:
# the request was fine, so the client gets UNAVAILABLE ("retry"), not INTERNAL.
_STEP_DOWN = (
    "Request for unknown model",
    "has no available versions",
    "is not ready",
    "is not healthy",
    "Stub process",
)


def forwarded_error(pb: Any, error: Any) -> Any:
    """A TritonError for the client with the called model's message and its real code (see code_name)."""
    message = error.message()
    name = code_name(pb, error, message)
    if name in ("INTERNAL", "UNKNOWN", "NOT_FOUND") and any(s in message for s in _STEP_DOWN):
        name, message = "UNAVAILABLE", f"unavailable (model_reloading): {message}"
    value = getattr(pb.TritonError, name, None)
    return pb.TritonError(message, value) if value is not None else pb.TritonError(message)


def drain_stream(stream: Any, request_id: str) -> None:
    """Read a decoupled BLS response stream to its end, here, on the caller's thread (which holds the GIL).

    python_backend r24.10 (Triton 2.51): a ``ResponseIterator`` keeps every response it handed out; dropped
    before its end, its destructor reads the rest with the GIL released, and when its last reference goes on the
    stub's stub-to-parent service thread (``Stub::SendCleanupId``) all those responses free their tensors there,
    without the GIL: the stub dies (SIGSEGV or a corrupted heap) and every stream through it hangs (cores from one
    H200 and the 2-core CPU VM, 2026-12-03; docs/RELIABILITY.md section 6). Read to its end, the iterator asks
    for that cleanup itself; :class:`LateRelease` then keeps it until the cleanup is done."""
    try:
        for _ in stream:
            pass
    except Exception as exc:  # noqa: BLE001 - the request is already answered; the stream only has to end
        log.debug("request %s: draining the language stream ended with %s", request_id, exc)


#: How long a finished BLS stream is kept: the stub's service thread drops its own reference well within it.
LATE_RELEASE_S = 5.0


class LateRelease:
    """Keeps objects for ``delay_s``, then drops them on its own Python thread (with the GIL).

    A finished ``ResponseIterator`` is referenced by the stub's cleanup map too; whichever reference goes last
    destroys it and the responses it holds. Kept here past the stub's cleanup, the last one is ours, dropped
    where the GIL is held."""

    def __init__(self, delay_s: float = LATE_RELEASE_S, name: str = "mm-late-release") -> None:
        self.delay_s = delay_s
        self._kept: collections.deque[tuple[float, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._name = name
        self._thread: threading.Thread | None = None
        self._closed = False

    def keep(self, obj: Any) -> None:
        with self._cond:
            if self._closed:  # the model is being unloaded: the caller drops it now, while the stub is attached
                return
            self._kept.append((time.monotonic() + self.delay_s, obj))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Drop everything kept, here, once the newest has been kept its delay (the model's ``finalize``: what
        is still kept must go while the stub is attached; freed at interpreter exit, a response frees shared
        memory that is gone: SIGSEGV)."""
        with self._cond:
            newest = self._kept[-1][0] if self._kept else 0.0
        time.sleep(min(max(0.0, newest - time.monotonic()), self.delay_s))
        with self._cond:
            kept, self._kept = self._kept, collections.deque()
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)  # not in the middle of dropping one when close returns
        kept.clear()  # the last references, dropped with the GIL held

    def __len__(self) -> int:
        with self._cond:
            return len(self._kept)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._kept and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                due, _ = self._kept[0]
                wait_s = due - time.monotonic()
                if wait_s > 0:
                    self._cond.wait(wait_s)
                    continue
                _, obj = self._kept.popleft()
            del obj  # the last reference, dropped here with the GIL held
