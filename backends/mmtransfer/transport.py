"""Transports move chunk bytes; the control channel only tells them what to move.

A transport is told, on the sender, to send tokens ``[offset, offset + n)`` of an
allocation, and on the receiver, to land ``n`` tokens into the first rows of its
window. ``HostTransport`` returns the bytes as inline frames that ride on the
CHUNK reply (works across processes and hosts, no GPU needed); out-of-band
transports (NCCL, CUDA IPC) return no frames and move the bytes themselves.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from .errors import ProtocolError
from .pool import BlockPool


class Transport(ABC):
    """Moves the bytes of one chunk between a sender's pool and a receiver's pool.

    Contract: for every CHUNK the sender calls ``send_chunk`` exactly once and the
    receiver calls ``recv_chunk`` exactly once, in the same order per peer pair.
    ``recv_chunk`` returns only when the rows are usable on the receiver's device.
    """

    name: str = ""

    @abstractmethod
    def send_chunk(
        self, peer: str, pool: BlockPool, block_ids: Sequence[int], offset: int, num_tokens: int
    ) -> list[memoryview]:
        """Start sending; return frames to attach to the CHUNK reply (may be empty)."""

    @abstractmethod
    def recv_chunk(
        self, peer: str, pool: BlockPool, block_ids: Sequence[int], num_tokens: int, frames: Sequence[bytes]
    ) -> None:
        """Land ``num_tokens`` tokens into the first rows of ``block_ids``."""


class HostTransport(Transport):
    """Chunk bytes travel inline on the control connection (ZeroMQ over TCP)."""

    name = "host"

    def send_chunk(self, peer, pool, block_ids, offset, num_tokens):
        rows = pool.gather(block_ids, num_tokens, offset)
        if rows.device.type != "cpu":
            rows = rows.cpu()
        # uint8 view: numpy has no bfloat16, and the receiver reinterprets by its own dtype.
        return [memoryview(rows.contiguous().view(torch.uint8).numpy()).cast("B")]

    def recv_chunk(self, peer, pool, block_ids, num_tokens, frames):
        expected = num_tokens * pool.bytes_per_token
        if len(frames) != 1 or len(frames[0]) != expected:
            got = [len(f) for f in frames]
            raise ProtocolError(f"host transport: expected one frame of {expected} bytes, got {got}")
        data = torch.frombuffer(bytearray(frames[0]), dtype=pool.dtype).view(num_tokens, pool.hidden)
        pool.scatter(block_ids, data.to(pool.device))
