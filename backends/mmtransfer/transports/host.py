"""The host link: chunk bytes travel inline on the control connection (ZeroMQ over TCP), as one
payload frame after the CHUNK header. Works between any two processes and hosts, no GPU needed.

There is no channel: a host PULL names none (two CPU pools on one host use shm unless a side forces
host or the pool cannot be mapped; then this link serves them), and every host PULL asks for one
chunk (the window bounds the bytes in flight). The control path is kept lean: the receiver takes the
payload frame without copying it out of ZeroMQ and copies it once, straight into the assembled
embedding (no landing in the window's blocks and gathering out of them).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import numpy as np
import torch

from ..enums import Landing, Transport
from ..errors import ProtocolError
from .base import Pieces, ReceiverLink, SenderLink
from .streams import current_stream


class HostSenderLink(SenderLink):
    kind = Transport.HOST
    names_pieces = False

    def send(self, pieces: Pieces) -> list[memoryview]:
        rows = self.pool.flat_rows
        # a copy, never a view of the pool: ZeroMQ sends it later, and the blocks may be freed by then
        data = torch.cat([rows[row : row + n] for row, n in pieces])
        if data.device.type != "cpu":
            data = data.cpu()
        # uint8 view: numpy has no bfloat16, and the receiver reinterprets by its own dtype.
        return [memoryview(data.contiguous().view(torch.uint8).numpy()).cast("B")]


class HostReceiverLink(ReceiverLink):
    kind = Transport.HOST
    pipelined = False
    names_pieces = False
    has_channel = False

    @property
    def stream(self) -> Any:
        """The calling thread's stream: host pulls share the link but not their work."""
        return current_stream(self.pool.device)

    @classmethod
    def connect(cls, link_id, pool, address, ack, timeout_s) -> HostReceiverLink:
        return cls("", pool, address)

    def landing(self, configured: Landing) -> Landing:
        return Landing.DIRECT  # the payload frame is the landing buffer: one copy, into the embedding

    def payload_bytes(self, capacity_tokens: int) -> int:
        return capacity_tokens * self.pool.bytes_per_token

    def exclusive(self) -> AbstractContextManager:
        return nullcontext()  # nothing pairs by order: host pulls run concurrently

    def post(self, pieces: Pieces, dests: Sequence[torch.Tensor], frames: Sequence[bytes]) -> None:
        pool = self.pool
        tokens = sum(int(d.shape[0]) for d in dests)
        expected = tokens * pool.bytes_per_token
        if len(frames) != 1 or len(frames[0]) != expected:
            raise ProtocolError(
                f"host link: expected one payload frame of {expected} bytes, got {[len(f) for f in frames]}"
            )
        if pool.device.type == "cpu":
            # numpy copies from the read-only frame without a staging copy (bfloat16 moves as bytes)
            src, start = np.frombuffer(frames[0], dtype=np.uint8), 0
            for dst in dests:
                flat = dst.view(torch.uint8).numpy().reshape(-1)
                np.copyto(flat, src[start : start + flat.size])
                start += flat.size
            return
        data = torch.frombuffer(bytearray(frames[0]), dtype=pool.dtype).view(tokens, pool.hidden).to(pool.device)
        token = 0
        for dst in dests:
            n = int(dst.shape[0])
            dst.copy_(data[token : token + n], non_blocking=True)
            token += n

    def adopt(self, frames: Sequence[Any], tokens: int) -> torch.Tensor | None:
        """A one-chunk embedding into a CPU pool is the received payload itself: a writable view of the
        ZeroMQ message (it lives as long as the tensor does), no copy at all."""
        pool = self.pool
        if pool.device.type != "cpu" or len(frames) != 1 or not isinstance(frames[0], memoryview):
            return None
        if frames[0].readonly or frames[0].nbytes != tokens * pool.bytes_per_token:
            return None  # a wrong size is refused by ``post``
        return torch.frombuffer(frames[0], dtype=pool.dtype).view(tokens, pool.hidden)

    def drain(self, timeout_s: float) -> bool:
        return True  # nothing is enqueued out of band
