"""Hooks through which endpoints report what happened (metrics live outside the library)."""

from __future__ import annotations

from dataclasses import dataclass

from .enums import FailureCause


@dataclass(frozen=True)
class TransferRecord:
    """One completed pull, as the receiver saw it."""

    transfer_id: str
    request_id: str
    tokens: int
    nbytes: int
    chunks: int
    window_blocks: int
    latency_s: float
    ready_s: float = 0.0  # from the pull being issued to the embedding being usable (before DONE/ACK)
    transport: str = "host"

    @property
    def continuations(self) -> int:
        return self.chunks - 1


class TransferObserver:
    """No-op base; override what you count. Called from endpoint threads: keep it cheap."""

    def transfer_completed(self, record: TransferRecord) -> None:
        pass

    def transfer_failed(self, cause: FailureCause) -> None:
        """A transfer failed; ``cause`` is the error's ``FailureCause``."""

    def pool_changed(self) -> None:
        """Blocks were allocated or freed (e.g. to refresh a usage gauge)."""
