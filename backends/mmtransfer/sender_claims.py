"""The sender's answer to a CLAIM (server thread only).

A receiver that maps this pool (CUDA IPC on the same GPU, shm on the same host) holding an EMBED_REF with rows
sends a CLAIM naming them and copies at once, with no PULL; it hands the embedding out only on this desk's ACK.
The ACK is given only for exactly the transfer's own blocks (a forged or stale ref gets ERROR, and its receiver
discards what it copied) and binds the transfer to that receiver like a first PULL; a claimed transfer's blocks
stay until its DONE (which ``PullServer.on_done`` leaves unanswered) or ABORT.
"""

from __future__ import annotations

from typing import Callable

from . import wire
from .enums import ErrorCode
from .pool import BlockPool
from .sender_server import Outbox
from .sender_table import Entry, TransferTable


class ClaimDesk:
    def __init__(
        self, pool: BlockPool, table: TransferTable, outbox: Outbox, reply_unknown: Callable[[bytes, str, int], None]
    ) -> None:
        self.pool = pool
        self.table = table
        self.outbox = outbox
        self.reply_unknown = reply_unknown  # how an id that is not (or no longer) here is answered

    def on_claim(self, identity: bytes, claim: wire.Claim) -> None:
        """ACK only this transfer's own blocks; the blocks stay until DONE."""
        entry = self.table.get(claim.transfer_id)
        if entry is None:
            self.reply_unknown(identity, claim.transfer_id, claim.seq)
            return
        if entry.aux is None or not self.rows_match(entry, claim.rows):
            self.outbox.error(
                identity,
                claim.transfer_id,
                claim.seq,
                ErrorCode.BAD_REQUEST,
                "the rows read are not this transfer's blocks",
            )
            return
        refusal = self.table.admit(entry, identity, 0, entry.aux.total_tokens, 0, 0)  # one receiver at a time
        if refusal is not None:
            self.outbox.error(identity, claim.transfer_id, claim.seq, *refusal)
            return
        entry.claimed = True
        self.table.touch(entry)
        self.outbox.send(identity, wire.Ack(claim.transfer_id, claim.seq))

    def rows_match(self, entry: Entry, rows: tuple[tuple[int, int], ...]) -> bool:
        """``rows`` are exactly the (merged) pool runs holding the entry's embedding, in token order."""
        segs = self.pool.segments(entry.blocks, entry.aux.total_tokens)
        return tuple((s.pool_row, s.length) for s in segs) == rows
