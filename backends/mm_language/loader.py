"""The ImageLoader of ``mm_language``: pulls a request's EMBED_REFs, in prompt order, on an engine loader thread.

Pulls of different requests run on different loader threads and overlap the engine's decode steps; the
Receiver is thread-safe. Whatever has not been pulled when the request ends early (a failed pull, a
cancellation, a deadline, the engine closing) is aborted on its sender, so no encoder block waits for its TTL.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

from mm_engine.api import ImageLoader
from mm_models.qwen2vl import EncodedImage
from mmtransfer import EmbedRef, ProtocolError, Receiver, TransferCancelled, TransferRecord

log = logging.getLogger(__name__)


class PullLoader(ImageLoader):
    def __init__(self, receiver: Receiver, refs: Sequence[EmbedRef], request_id: str) -> None:
        self._receiver = receiver
        self._refs = list(refs)
        self._request_id = request_id
        self._next = 0  # refs before this index were pulled (or are being pulled)
        self._aborted = False
        self._lock = threading.Lock()
        self.records: list[TransferRecord] = []

    def load(self, cancelled: Callable[[], bool]) -> list[EncodedImage]:
        images: list[EncodedImage] = []
        for i, ref in enumerate(self._refs):
            with self._lock:
                if self._aborted:
                    raise TransferCancelled(f"request {self._request_id}: loading was aborted")
                self._next = i + 1
            try:
                images.append(self._pull_one(i, ref, cancelled))
            except BaseException:
                self.abort(f"an earlier image of request {self._request_id} failed")
                raise
        return images

    def _pull_one(self, index: int, ref: EmbedRef, cancelled: Callable[[], bool]) -> EncodedImage:
        received = self._receiver.pull(ref, self._request_id, cancelled)
        grid = received.aux.extras.get("grid_thw")
        if not grid or len(grid) != 3:
            raise ProtocolError(f"EMBED_REF[{index}]: the sender sent no grid_thw for the image")
        rows = int(received.embedding.shape[0])
        if rows != ref.num_tokens:
            raise ProtocolError(
                f"EMBED_REF[{index}]: the embedding has {rows} tokens, its EMBED_REF said {ref.num_tokens}"
            )
        self.records.append(received.record)
        return EncodedImage(embeds=received.embedding, grid_thw=tuple(int(v) for v in grid))

    def abort(self, reason: str) -> None:
        with self._lock:
            self._aborted = True
            rest = self._refs[self._next :]
            self._next = len(self._refs)
        for ref in rest:
            try:
                self._receiver.abort(ref, reason)
            except Exception:  # noqa: BLE001 - abort never raises; the sender's TTL is the backstop
                log.debug("request %s: abort of %s failed", self._request_id, ref.transfer_id, exc_info=True)
