"""CUDA streams and events for the links, with CPU stand-ins (a CPU pool runs everything at once).

Links enqueue work on their own stream and track completion with events, never a device-wide
sync; ``wait_event`` polls with a bound, because a blocking ``synchronize`` could wait forever
on a NCCL operation whose peer is gone.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ..errors import TransferTimeout

_POLL_S = 0.001
_SPIN_S = 0.02


class HostStream:
    """Stands in for a CUDA stream when the pool is on the CPU: work runs at once, except work a CPU
    stand-in of a library defers (``defer``: a receive posted before its send, as the unit tests' NCCL
    stand-in does); an event recorded here completes once the work deferred before it did. Its
    ``cuda_stream`` handle is unique, so a stand-in given the handle finds the stream (``host_stream``)."""

    _handles = itertools.count(1)

    def __init__(self) -> None:
        self.cuda_stream = next(HostStream._handles)
        self._pending: list[Callable[[], bool]] = []
        _HOST_STREAMS[self.cuda_stream] = self

    def defer(self, done: Callable[[], bool]) -> None:
        """Work enqueued here that completes when ``done()`` turns True."""
        self._pending.append(done)

    def pending(self) -> list[Callable[[], bool]]:
        self._pending = [d for d in self._pending if not d()]
        return list(self._pending)

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        HostEvent(self.pending()).synchronize()


_HOST_STREAMS: weakref.WeakValueDictionary[int, HostStream] = weakref.WeakValueDictionary()


def host_stream(handle: int) -> HostStream | None:
    """The CPU stand-in stream whose ``cuda_stream`` is ``handle`` (None if it is gone or never was)."""
    return _HOST_STREAMS.get(handle)


class DoneEvent:
    """Stands in for a CUDA event on the CPU: always complete."""

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class HostEvent(DoneEvent):
    """Stands in for a CUDA event recorded behind deferred CPU work: complete once that work is."""

    def __init__(self, pending: list[Callable[[], bool]]) -> None:
        self._pending = pending

    def query(self) -> bool:
        return all(done() for done in self._pending)

    def synchronize(self) -> None:
        while not self.query():
            time.sleep(_POLL_S)


def new_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device) if device.type == "cuda" else HostStream()


def record_event(stream: Any, device: torch.device, timing: bool = False) -> Any:
    if device.type != "cuda":
        pending = stream.pending() if isinstance(stream, HostStream) else []
        return HostEvent(pending) if pending else DoneEvent()
    event = torch.cuda.Event(enable_timing=timing)
    event.record(stream)
    return event


def elapsed_us(start: Any, end: Any) -> float | None:
    """GPU time between two completed timing events, in microseconds (None on the CPU)."""
    if isinstance(start, DoneEvent) or isinstance(end, DoneEvent):
        return None
    return start.elapsed_time(end) * 1e3


def use_stream(stream: Any):
    return torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else nullcontext()


def use_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def current_stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device) if device.type == "cuda" else HostStream()


def set_thread_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)


def wait_event(event: torch.cuda.Event, timeout_s: float, blocking: bool = False) -> bool:
    """Poll ``event`` until it completes (True) or ``timeout_s`` passes (False). A blocking
    ``synchronize`` could wait forever on a NCCL operation whose peer is gone. The first
    milliseconds spin (yielding the GIL), so a short transfer is seen the moment it lands.

    ``blocking``: the work cannot hang on a peer (copies within one GPU): ``synchronize`` waits with
    the GIL released, so the thread neither polls nor competes for the GIL with one launching kernels."""
    if event.query():
        return True
    if blocking:
        event.synchronize()
        return True
    start = time.monotonic()
    deadline = start + timeout_s
    spin_until = start + _SPIN_S
    sleep = 0.00005
    while not event.query():
        now = time.monotonic()
        if now > deadline:
            return False
        if now < spin_until:
            time.sleep(0)
        else:
            time.sleep(sleep)
            sleep = min(sleep * 2, _POLL_S)
    return True


def run_with_timeout(fn, timeout_s: float, what: str):
    """Run a blocking call (e.g. ncclCommInitRank, which drops the GIL) in a helper thread and give
    up after ``timeout_s``: the caller gets TransferTimeout; the helper thread is left behind."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"mmtransfer-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TransferTimeout(f"{what} did not finish within {timeout_s:.0f}s (is the peer alive?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")
