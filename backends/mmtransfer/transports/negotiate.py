"""Which transport a (sender, receiver) pair uses: ``auto`` on both sides -> the natural one (both pools on
the CPU of one host -> shm; a CPU pool otherwise -> host; the same GPU -> cuda_ipc; else nccl); a side that
forces a transport gets it if the other side allows it and it can connect the two pools; else
``TransportUnavailable``."""

from __future__ import annotations

from ..device import DeviceInfo
from ..enums import Transport
from ..errors import TransportUnavailable


def feasible(kind: Transport, sender: DeviceInfo, receiver: DeviceInfo) -> str:
    """ "" when transport ``kind`` can connect these two pools, else the reason it cannot."""
    if kind is Transport.HOST:
        return ""
    if kind is Transport.NCCL:
        if not (sender.is_cuda and receiver.is_cuda):
            return "nccl needs both pools on CUDA devices"
        if sender.same_gpu(receiver):
            return (
                "nccl cannot connect two ranks on one GPU (NCCL refuses a duplicate GPU); "
                "use transport=cuda_ipc or auto"
            )
        return ""
    if kind is Transport.SHM:
        if sender.is_cuda or receiver.is_cuda:
            return "shm needs both pools on the CPU (a GPU pool uses cuda_ipc or nccl)"
        if not sender.host or sender.host != receiver.host:
            return (
                f"shm needs both pools on the same host (sender on {sender.host or '?'}, receiver on "
                f"{receiver.host or '?'}); use transport=host or auto"
            )
        return ""
    if kind is Transport.CUDA_IPC:
        return "" if sender.same_gpu(receiver) else "cuda_ipc needs both pools on the same GPU of the same host"
    return f"unknown transport {kind!r}"


def natural_transport(sender: DeviceInfo, receiver: DeviceInfo) -> Transport:
    """What ``auto`` picks."""
    if not feasible(Transport.SHM, sender, receiver):  # two CPU pools on one host
        return Transport.SHM
    if not (sender.is_cuda and receiver.is_cuda):
        return Transport.HOST
    return Transport.CUDA_IPC if sender.same_gpu(receiver) else Transport.NCCL


def negotiate(
    sender_pref: Transport | str, receiver_pref: Transport | str, sender: DeviceInfo, receiver: DeviceInfo
) -> Transport:
    """The transport for a pair (see the module docstring)."""
    prefs = (Transport(sender_pref), Transport(receiver_pref))
    forced = {p for p in prefs if p is not Transport.AUTO}
    if len(forced) > 1:
        raise TransportUnavailable(
            f"sender forces transport={prefs[0].value!r}, receiver forces transport={prefs[1].value!r}"
        )
    choice = forced.pop() if forced else natural_transport(sender, receiver)
    why = feasible(choice, sender, receiver)
    if why:
        raise TransportUnavailable(
            f"transport {choice.value!r} cannot connect sender ({sender.kind} {sender.uuid or ''}) and receiver "
            f"({receiver.kind} {receiver.uuid or ''}): {why}"
        )
    return choice
