"""Transports move chunk bytes; the control channel only tells them what to move.

A transport is told, on the sender, to send tokens ``[offset, offset + n)`` of an
allocation, and on the receiver, to land ``n`` tokens into the first rows of its
window. ``HostTransport`` returns the bytes as inline frames that ride on the
CHUNK reply (works across processes and hosts, no GPU needed); out-of-band
transports (NCCL, CUDA IPC) return no frames and move the bytes themselves.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import ProtocolError
from .pool import BlockPool

if TYPE_CHECKING:
    from .cuda import DeviceInfo


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


# ---- choosing a transport for a (sender, receiver) pair -------------------------------------------
def feasible(name: str, sender: "DeviceInfo", receiver: "DeviceInfo") -> str:
    """"" when transport ``name`` can connect these two pools, else the reason it cannot."""
    if name == "host":
        return ""
    both_cuda = sender.is_cuda and receiver.is_cuda
    same_gpu = both_cuda and sender.uuid == receiver.uuid and sender.host == receiver.host
    if name == "nccl":
        if not both_cuda:
            return "nccl needs both pools on CUDA devices"
        if same_gpu:
            return ("nccl cannot connect two ranks on one GPU (NCCL refuses a duplicate GPU); "
                    "use transport=cuda_ipc or auto")
        return ""
    if name == "cuda_ipc":
        return "" if same_gpu else "cuda_ipc needs both pools on the same GPU of the same host"
    return f"unknown transport {name!r}"


def natural_transport(sender: "DeviceInfo", receiver: "DeviceInfo") -> str:
    """What ``auto`` picks: no GPU on either side -> host; same GPU -> cuda_ipc; else nccl."""
    if not (sender.is_cuda and receiver.is_cuda):
        return "host"
    if sender.uuid == receiver.uuid and sender.host == receiver.host:
        return "cuda_ipc"
    return "nccl"


def negotiate(sender_pref: str, receiver_pref: str, sender: "DeviceInfo", receiver: "DeviceInfo") -> str:
    """The transport for a pair: ``auto`` on both sides -> the natural one; a side that forces a
    transport gets it if the other side allows it and it can connect the pools; else
    TransportUnavailable saying why."""
    from .cuda import TransportUnavailable

    forced = {p for p in (sender_pref, receiver_pref) if p != "auto"}
    if len(forced) > 1:
        raise TransportUnavailable(
            f"sender forces transport={sender_pref!r}, receiver forces transport={receiver_pref!r}")
    choice = forced.pop() if forced else natural_transport(sender, receiver)
    why = feasible(choice, sender, receiver)
    if why:
        raise TransportUnavailable(
            f"transport {choice!r} cannot connect sender ({sender.kind} {sender.uuid or ''}) and receiver "
            f"({receiver.kind} {receiver.uuid or ''}): {why}")
    return choice
