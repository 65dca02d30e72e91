"""Channels: the per-(sender endpoint, receiver) state of the GPU transports.

A channel is opened by the receiver with a BOOTSTRAP message on the control connection and
lives until either side closes (or breaks) it. Both halves own a dedicated CUDA stream; work
is enqueued on it and completion is tracked with CUDA events, never a device-wide sync.

* ``nccl`` (``transport_nccl.py``): a 2-rank communicator, sender rank 0, receiver rank 1.
  NCCL pairs sends and receives by order, so every chunk counts as one operation on the
  channel (``ops``); the PULL carries the receiver's count and the sender refuses a PULL whose
  count differs from its own instead of pairing the wrong bytes.
* ``cuda_ipc`` (``transport_cuda_ipc.py``): the receiver maps the sender's pool storage once
  and copies pieces device-to-device on its own stream.

Piece lists (``protocol.split_pieces``) tell both sides how a chunk is cut: at the union of
the sender's block boundaries and the receiver's window runs.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from typing import Any, Sequence

import torch

from .errors import TransferError, TransferTimeout
from .pool import BlockPool

log = logging.getLogger(__name__)
_POLL_S = 0.001
_SPIN_S = 0.02


class ChannelError(TransferError):
    """A GPU channel failed; it is given up and the next pull opens a new one."""

    cause = "channel"


# ---- streams and events; on a CPU pool (unit tests of the channel logic) work is synchronous ----
class HostStream:
    """Stands in for a CUDA stream when the pool is on the CPU: everything runs at once."""

    cuda_stream = 0

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class DoneEvent:
    """Stands in for a CUDA event on the CPU: always complete."""

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def new_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device) if device.type == "cuda" else HostStream()


def record_event(stream: Any, device: torch.device, timing: bool = False) -> Any:
    if device.type != "cuda":
        return DoneEvent()
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


def wait_event(event: "torch.cuda.Event", timeout_s: float) -> bool:
    """Poll ``event`` until it completes (True) or ``timeout_s`` passes (False). A blocking
    ``synchronize`` could wait forever on a NCCL operation whose peer is gone. The first
    milliseconds spin (yielding the GIL), so a short transfer is seen the moment it lands."""
    if event.query():
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


class SenderChannel:
    """Sender half. Methods are called from the endpoint's single server thread."""

    transport = ""

    def __init__(self, channel_id: str, pool: BlockPool) -> None:
        self.channel_id = channel_id
        self.pool = pool
        self.ops = 0  # chunks sent on this channel (NCCL ordering check)
        self.last_used = time.monotonic()  # of the last PULL served on it (idle channels are closed)

    def ack_fields(self) -> dict[str, Any]:
        """Extra BOOTSTRAP_ACK fields (nccl_id / ipc)."""
        return {}

    def wait_ready(self, timeout_s: float) -> None:
        """Raise if the channel could not be formed (within ``timeout_s``)."""

    def send(self, pieces: Sequence[tuple[int, int]]) -> None:
        """Move one chunk's pieces ((pool row, tokens), in token order)."""

    def record(self) -> "torch.cuda.Event | None":
        """An event completing when everything sent so far has left the pool (None: nothing in flight)."""
        return None

    def close(self) -> None:
        pass


class ReceiverChannel:
    """Receiver half. ``lock`` serialises its users: one PULL and the posting of its chunks at a
    time per channel, so sends and receives pair up in the same order on both sides."""

    transport = ""

    def __init__(self, channel_id: str, pool: BlockPool, address: str) -> None:
        self.channel_id = channel_id
        self.pool = pool
        self.address = address
        self.lock = threading.Lock()
        self.ops = 0  # chunks posted on this channel
        self.broken = False
        self.stream = new_stream(pool.device)

    def post(self, pieces: Sequence[tuple[int, int]], dests: Sequence[torch.Tensor]) -> None:
        """Enqueue the move of one chunk: piece i ((sender row, n)) lands in ``dests[i]`` ([n, hidden])."""
        raise NotImplementedError

    def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) for everything enqueued; False if it did not finish in time."""
        return wait_event(record_event(self.stream, self.pool.device), timeout_s)

    def close(self) -> None:
        pass


def open_sender_channel(transport: str, channel_id: str, pool: BlockPool, timeout_s: float) -> SenderChannel:
    if transport == "nccl":
        from .transport_nccl import NcclSenderChannel

        return NcclSenderChannel(channel_id, pool, timeout_s)
    if transport == "cuda_ipc":
        from .transport_cuda_ipc import IpcSenderChannel

        return IpcSenderChannel(channel_id, pool)
    raise ValueError(f"no channel for transport {transport!r}")


def open_receiver_channel(transport: str, channel_id: str, pool: BlockPool, address: str, ack: Any,
                          timeout_s: float) -> ReceiverChannel:
    if transport == "nccl":
        from .transport_nccl import NcclReceiverChannel

        return NcclReceiverChannel(channel_id, pool, address, ack.nccl_id, timeout_s)
    if transport == "cuda_ipc":
        from .transport_cuda_ipc import IpcReceiverChannel

        if ack.ipc is None:
            raise ChannelError("cuda_ipc BOOTSTRAP_ACK carries no IPC handle")
        return IpcReceiverChannel(channel_id, pool, address, ack.ipc)
    raise ValueError(f"no channel for transport {transport!r}")


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
