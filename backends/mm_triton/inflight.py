"""The public pipelines' requests in flight in an internal model, failed when that model's stub dies.

Triton 2.51 does not fail requests whose stub died: an engine-backed model (``mm_language``) answers through
response senders that die with its process, so a BLS caller would wait forever. The pipeline registers each
step call here with the stubs of the called model at that moment (they are its own siblings: children of the
same tritonserver, read from ``/proc`` like the watchdog does); a monitor thread polls them every
``interval_s`` and answers UNAVAILABLE (stub_died) for a request whose step model lost a stub since. With
several instances the request may have run on a live one: it is failed anyway (retryable), and its late answer
is dropped.

The same thread passes a client's cancellation on to the step it is waiting for (a BLS call cannot be
cancelled in Triton 2.51): the pipeline gives a probe and an ``on_cancel`` (posting the step's key on the
:mod:`mm_triton.cancel_board`), and the request is answered CANCELLED.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .watchdog import Stub, alive, list_stubs

log = logging.getLogger(__name__)


class Answer:
    """One client request's response sender; the first FINAL answer wins (worker or monitor)."""

    def __init__(self, pb_utils: Any, sender: Any, request_id: str, on_final: Callable[[], None] | None = None) -> None:
        self._pb = pb_utils
        self._sender = sender
        self.request_id = request_id
        self._on_final = on_final  # once, when the request is answered (the pipeline frees its slot)
        self._lock = threading.Lock()
        self.done = False

    def client_cancelled(self, probe: Callable[[], bool]) -> bool:
        """``probe()`` (the request's ``is_cancelled``) while the request is unanswered, else False. Under the
        send lock: once the FINAL answer is out Triton frees the request's response factory, and asking it then
        crashes tritonserver 2.51 (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled, seen on an H200 with the
        monitor thread probing while the worker answered)."""
        with self._lock:
            return not self.done and probe()

    def send(self, response: Any = None, final: bool = False) -> None:
        with self._lock:
            if self.done:
                return
            flags = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            try:
                if response is None:
                    self._sender.send(flags=flags)
                else:
                    self._sender.send(response, flags=flags)
            except Exception as exc:  # noqa: BLE001 - the client went away
                final = True
                log.info("request %s: response not delivered: %s", self.request_id, exc)
            if final:
                self.done = True
                if self._on_final is not None:
                    self._on_final()


@dataclass
class _Entry:
    answer: Answer
    model: str
    stubs: list[Stub] = field(default_factory=list)
    cancelled: Callable[[], bool] | None = None  # the client's cancellation probe
    on_cancel: Callable[[], None] | None = None  # passes it on to the step (BLS calls cannot be cancelled)


class StepMonitor:
    def __init__(
        self, pb_utils: Any, interval_s: float = 0.25, stubs_of: Callable[[], dict[int, Stub]] | None = None
    ) -> None:
        self._pb = pb_utils
        self.interval_s = interval_s
        self._stubs_of = stubs_of or (lambda: list_stubs(os.getppid()))
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mm-step-monitor", daemon=True)
        self._thread.start()

    def enter(
        self,
        answer: Answer,
        model: str,
        cancelled: Callable[[], bool] | None = None,
        on_cancel: Callable[[], None] | None = None,
    ) -> int:
        """Watch a step call; with ``cancelled``, a client that gives up during it gets ``on_cancel()`` called
        and its request answered CANCELLED at once."""
        stubs = [s for s in self._stubs_of().values() if s.model == model]
        key = id(answer)
        with self._lock:
            self._entries[key] = _Entry(answer, model, stubs, cancelled, on_cancel)
        return key

    def leave(self, key: int) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def check_once(self) -> int:
        """Fail the requests whose step model lost a stub, pass on the cancellations; returns how many ended."""
        with self._lock:
            entries = list(self._entries.items())
        ended = 0
        for key, entry in entries:
            dead = [s for s in entry.stubs if not alive(s)]
            if dead:
                message = (
                    f"unavailable (stub_died): {entry.model} instance {dead[0].instance} died while serving this "
                    "request; retry"
                )
                self._end(key, entry, "UNAVAILABLE", message)
                log.warning("request %s: %s", entry.answer.request_id, message)
            elif entry.cancelled is not None and entry.answer.client_cancelled(entry.cancelled):
                if entry.on_cancel is not None:
                    entry.on_cancel()
                self._end(key, entry, "CANCELLED", f"request {entry.answer.request_id} was cancelled")
                log.info("request %s: cancelled by its client during %s", entry.answer.request_id, entry.model)
            else:
                continue
            ended += 1
        return ended

    def _end(self, key: int, entry: _Entry, code_name: str, message: str) -> None:
        self.leave(key)
        err = self._pb.TritonError
        code = getattr(err, code_name, None)
        entry.answer.send(
            self._pb.InferenceResponse(error=err(message, code) if code is not None else err(message)), final=True
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self._entries:
                    self.check_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one failure
                log.exception("step monitor failed")

    def close(self) -> None:
        self._stop.set()
