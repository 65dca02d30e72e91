"""Shareable host memory for CPU block pools: an anonymous ``memfd`` file, mapped ``MAP_SHARED``.

Why memfd and not a named ``/dev/shm`` segment: the file has no name, so nothing is left behind when a process
dies (issue 14 counts leaked /dev/shm regions as a defect), and Docker's 64 MiB /dev/shm limit does not apply.
Another process of the same user maps it by opening ``/proc/<pid>/fd/<fd>`` (the kernel checks it may trace
the owner: same uid, same pid namespace, /proc not hardened); this process can too. The descriptor stays
open as long as the pool does; a mapping lives as long as any array or tensor viewing it (``_map``).

``export`` names the region; ``map_readonly`` maps a peer's region after checking that the file it opened is
the one exported (the same inode and size: a pid or descriptor number reused by something else is refused).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
_NAME = "mmtransfer-pool"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, nbytes: int, prot: int) -> np.ndarray:
    """``fd`` mapped MAP_SHARED as a uint8 array; unmapped once nothing views it. Not Python's ``mmap``: it
    dup()s the descriptor and holds the copy open, one more descriptor per pool and per mapped peer."""
    ptr = _libc.mmap(None, nbytes, prot, mmap.MAP_SHARED, fd, 0)
    if ptr is None or ptr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {nbytes} bytes: {os.strerror(err)}")
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    weakref.finalize(buf, _libc.munmap, ptr, nbytes)  # every array (and tensor) over it holds ``buf``
    array = np.frombuffer(buf, dtype=np.uint8)
    if not prot & mmap.PROT_WRITE:
        array.flags.writeable = False
    return array


@dataclass(frozen=True)
class Region:
    """One memfd mapping: ``fd`` open while the owner lives; ``inode`` identifies the file across processes."""

    fd: int
    size_bytes: int
    inode: int
    array: np.ndarray  # uint8 [size_bytes], the writable mapping

    def export(self) -> dict[str, int]:
        return {"pid": os.getpid(), "fd": self.fd, "inode": self.inode, "size_bytes": self.size_bytes}


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype, owner: object) -> tuple[torch.Tensor, Region | None]:
    """An uninitialised CPU tensor in a memfd region (closed with ``owner``), or a plain one and None where
    memfd is not available (not Linux, a seccomp filter): then the pool just cannot be shared."""
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = elem * int(np.prod(shape, dtype=np.int64))
    if nbytes == 0 or not hasattr(os, "memfd_create"):
        return torch.empty(shape, dtype=dtype), None
    try:
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
    except OSError as exc:
        log.info("memfd_create failed (%s): this CPU pool cannot be shared with another process", exc)
        return torch.empty(shape, dtype=dtype), None
    try:
        os.ftruncate(fd, nbytes)
        array = _map(fd, nbytes, mmap.PROT_READ | mmap.PROT_WRITE)
        inode = os.fstat(fd).st_ino
    except OSError:
        os.close(fd)
        raise
    weakref.finalize(owner, os.close, fd)  # the descriptor, not the mapping: views outlive it safely
    tensor = torch.from_numpy(array).view(dtype).view(shape)
    return tensor, Region(fd, nbytes, inode, array)


def map_readonly(desc: dict[str, Any]) -> np.ndarray:
    """A peer's exported region as a read-only uint8 array; raises OSError when it cannot be opened or mapped,
    ValueError when the file opened is not the one exported."""
    path = f"/proc/{int(desc['pid'])}/fd/{int(desc['fd'])}"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_ino != desc["inode"] or st.st_size != desc["size_bytes"]:
            raise ValueError(
                f"{path} is not the exported pool (inode {st.st_ino}, {st.st_size} bytes; expected inode "
                f"{desc['inode']}, {desc['size_bytes']} bytes): the sender is gone or in another pid namespace"
            )
        return _map(fd, desc["size_bytes"], mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping stays valid without the descriptor


def still_exported(desc: dict[str, Any]) -> bool:
    """Whether the exporting process still holds the region (one stat: a restarted sender's is another file)."""
    try:
        return os.stat(f"/proc/{int(desc['pid'])}/fd/{int(desc['fd'])}").st_ino == desc["inode"]
    except OSError:
        return False
