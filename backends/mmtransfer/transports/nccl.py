"""NCCL point-to-point link: one 2-rank communicator per channel (sender rank 0, receiver rank 1).

Forming (lazily, at the first pull from a receiver to a sender endpoint):
  receiver -> BOOTSTRAP -> sender: ncclGetUniqueId, reply BOOTSTRAP_ACK(nccl_id), then
  ncclCommInitRank(rank 0) in a helper thread (the endpoint keeps serving); the receiver runs
  ncclCommInitRank(rank 1). Both warm the pair up at once: a 16-byte send/recv, checked on the
  receiver, so NCCL's lazy connection set-up never happens inside a request.

Moving a chunk: the sender posts ``ncclSend`` per piece in one ncclGroupStart/End on the
link's stream and records an event (its blocks are not freed before it completes); the
receiver posts ``ncclRecv`` per piece, also in one group, on its stream. The CHUNK header
reaches the receiver before it posts, so a receive is never posted for bytes that are not coming.
NCCL pairs sends and receives by order, so the link is ``ordered``: every chunk counts as one
operation (``ops``), the PULL carries the receiver's count and the sender refuses a PULL whose
count differs from its own instead of pairing the wrong bytes.

Early receives (protocol 3): with an EMBED_REF naming the embedding's rows, the receiver derives the
first chunk's pieces itself (``wire.chunk_pieces``, as the sender does), posts their receives right after
its PULL and says so (``Pull.early``); the sender posts the matching sends when the PULL arrives, or zeros
of the same lengths (``send_blank``) when it refuses the PULL, so the pairing holds either way.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import torch

from ..enums import Transport
from ..errors import ChannelError, TransferTimeout
from ..pool import BlockPool
from . import nccl_lib
from .base import Pieces, ReceiverLink, SenderLink
from .streams import (
    current_stream,
    new_stream,
    record_event,
    run_with_timeout,
    set_thread_device,
    use_device,
    wait_event,
)

log = logging.getLogger(__name__)
SENDER_RANK, RECEIVER_RANK = 0, 1
WARMUP_BYTES = 16


def _abort(lib: Any, comm: Any, link_id: str) -> None:
    if comm is not None:
        try:
            lib.comm_abort(comm)
        except nccl_lib.NcclError as exc:
            log.warning("nccl channel %s: abort failed: %s", link_id[:8], exc)


class NcclSenderLink(SenderLink):
    kind = Transport.NCCL
    ordered = True

    def __init__(self, link_id: str, pool: BlockPool, timeout_s: float) -> None:
        super().__init__(link_id, pool, timeout_s)
        self.lib = nccl_lib.load()
        self.device = pool.device
        with use_device(self.device):
            self.uid = self.lib.get_unique_id()
            self.stream = new_stream(self.device)
        self._sptr = int(self.stream.cuda_stream)
        self._bpt = pool.bytes_per_token
        self.comm: nccl_lib.ncclComm_t | None = None
        self._blank: torch.Tensor | None = None  # zeros paired with early receives of a refused PULL
        self._timeout_s = timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._form, name=f"nccl-init-{link_id[:8]}", daemon=True)
        self._thread.start()

    def ack_fields(self) -> dict[str, Any]:
        return {"nccl_id": nccl_lib.unique_id_to_hex(self.uid)}

    def _form(self) -> None:
        try:
            set_thread_device(self.device)
            self.comm = self.lib.comm_init_rank(2, self.uid, SENDER_RANK)
            warm = torch.arange(WARMUP_BYTES, dtype=torch.uint8, device=self.device)
            self.stream.wait_stream(current_stream(self.device))
            self.lib.send(warm.data_ptr(), WARMUP_BYTES, RECEIVER_RANK, self.comm, self._sptr)
            if not wait_event(record_event(self.stream, self.device), self._timeout_s):
                raise TransferTimeout(f"NCCL warm-up send not received within {self._timeout_s:.0f}s")
            log.info(
                "nccl channel %s formed (sender rank 0 on %s, NCCL %s)",
                self.link_id[:8],
                self.device,
                self.lib.version_string(),
            )
        except BaseException as exc:  # reported to the first PULL on the channel
            self._error = exc
            log.warning("nccl channel %s could not be formed: %s", self.link_id[:8], exc)
        finally:
            self._ready.set()

    def wait_ready(self, timeout_s: float) -> None:
        if not self._ready.wait(timeout_s):
            raise TransferTimeout(f"nccl channel {self.link_id[:8]} not formed within {timeout_s:.0f}s")
        if self._error is not None:
            raise ChannelError(f"nccl channel {self.link_id[:8]} could not be formed: {self._error}")

    def send(self, pieces: Pieces) -> list[memoryview]:
        lib, comm, sptr, bpt, pool = self.lib, self.comm, self._sptr, self._bpt, self.pool
        lib.group_start()
        try:
            for row, n in pieces:
                lib.send(pool.row_ptr(row), n * bpt, RECEIVER_RANK, comm, sptr)
        finally:
            lib.group_end()
        self.ops += 1
        return []

    def send_blank(self, lengths: Sequence[int]) -> None:
        """Zeros from a scratch buffer of this link (never pool rows: a refused receiver gets no one's data)."""
        need = max(lengths) * self._bpt
        if self._blank is None or self._blank.numel() < need:
            with use_device(self.device):
                self._blank = torch.zeros(need, dtype=torch.uint8, device=self.device)
            self.stream.wait_stream(current_stream(self.device))
        lib, comm, sptr, ptr = self.lib, self.comm, self._sptr, self._blank.data_ptr()
        lib.group_start()
        try:
            for n in lengths:
                lib.send(ptr, n * self._bpt, RECEIVER_RANK, comm, sptr)
        finally:
            lib.group_end()
        self.ops += 1

    def record(self) -> Any:
        return record_event(self.stream, self.device)

    def close(self) -> None:
        comm, self.comm = self.comm, None
        _abort(self.lib, comm, self.link_id)


class NcclReceiverLink(ReceiverLink):
    kind = Transport.NCCL
    posts_early = True

    def __init__(
        self, link_id: str, pool: BlockPool, address: str, nccl_id_hex: str = "", timeout_s: float = 0.0
    ) -> None:
        super().__init__(link_id, pool, address)
        self.lib = nccl_lib.load()
        uid = nccl_lib.unique_id_from_hex(nccl_id_hex)
        device = pool.device
        self._sptr = int(self.stream.cuda_stream)
        self._elt = pool.storage.element_size()

        def form():
            set_thread_device(device)
            return self.lib.comm_init_rank(2, uid, RECEIVER_RANK)

        self.comm = run_with_timeout(form, timeout_s, "ncclCommInitRank")
        try:
            self._warm_up(timeout_s)
        except BaseException:
            self.close()
            raise
        log.info(
            "nccl channel %s formed with %s (receiver rank 1 on %s, NCCL %s)",
            link_id[:8],
            address,
            device,
            self.lib.version_string(),
        )

    @classmethod
    def connect(cls, link_id, pool, address, ack, timeout_s) -> NcclReceiverLink:
        return cls(link_id, pool, address, ack.nccl_id, timeout_s)

    def _warm_up(self, timeout_s: float) -> None:
        device = self.pool.device
        warm = torch.empty(WARMUP_BYTES, dtype=torch.uint8, device=device)
        self.stream.wait_stream(current_stream(device))
        self.lib.recv(warm.data_ptr(), WARMUP_BYTES, SENDER_RANK, self.comm, self._sptr)
        if not self.drain(timeout_s):
            raise TransferTimeout(f"NCCL warm-up receive not completed within {timeout_s:.0f}s")
        if not torch.equal(warm.cpu(), torch.arange(WARMUP_BYTES, dtype=torch.uint8)):
            raise ChannelError("NCCL warm-up bytes arrived wrong")

    def post(self, pieces: Pieces, dests: Sequence[torch.Tensor], frames: Sequence[bytes]) -> None:
        lib, comm, sptr, elt = self.lib, self.comm, self._sptr, self._elt
        lib.group_start()
        try:
            for dst in dests:
                lib.recv(dst.data_ptr(), dst.numel() * elt, SENDER_RANK, comm, sptr)
        finally:
            lib.group_end()
        self.ops += 1

    def close(self) -> None:
        comm, self.comm = self.comm, None
        _abort(self.lib, comm, self.link_id)
