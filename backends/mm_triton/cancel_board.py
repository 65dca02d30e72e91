"""Cancellations a public pipeline passes on to the internal model that is generating for it.

Triton 2.51 cannot cancel a BLS call: when a client cancels ``mm_pipeline`` (or its gRPC deadline passes), the
``mm_language`` step would generate to the end. So the pipeline gives each language step a fresh random key
(input ``MM_CANCEL_KEY``) and, when its client gives up, posts that key on this server's board: an empty file
``<private dir>/cancel-<server>/<key>``. The engine's cancellation probe of the request looks for it between
decode steps, whichever ``mm_language`` instance runs it, and ends the sequence (its KV slot and blocks freed).
The pipeline clears the key when the step has returned; a board of a server that is gone is pruned with the
server's other private files (``mm_triton.access``).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .access import server_dir

CANCEL_KEY_INPUT = "MM_CANCEL_KEY"
_KEY = re.compile(r"[0-9a-f]{32}")


def new_cancel_key() -> str:
    return uuid.uuid4().hex


def check_cancel_key(key: str) -> str:
    """``key`` if it is a key :func:`new_cancel_key` makes (32 hex digits: never a path), else ValueError."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"{CANCEL_KEY_INPUT}: not a cancellation key (32 lowercase hex digits)")
    return key


class CancelBoard:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of_this_server(cls, server_pid: int | None = None, base: Path | None = None) -> CancelBoard:
        return cls(server_dir("cancel", server_pid, base))

    def post(self, key: str) -> None:
        path = self.directory / check_cancel_key(key)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))

    def posted(self, key: str) -> bool:
        return (self.directory / check_cancel_key(key)).exists()

    def clear(self, key: str) -> None:
        (self.directory / check_cancel_key(key)).unlink(missing_ok=True)

    def probe(self, key: str, min_interval_s: float = 0.02) -> Callable[[], bool]:
        """A ``() -> bool`` for the engine: True once ``key`` was posted (one stat per ``min_interval_s``)."""
        path = self.directory / check_cancel_key(key)
        state = {"at": float("-inf"), "value": False}

        def cancelled() -> bool:
            now = time.monotonic()
            if not state["value"] and now - state["at"] >= min_interval_s:
                state["at"] = now
                state["value"] = path.exists()
            return state["value"]

        return cancelled


def read_cancel_key(pb_utils: Any, request: Any) -> str | None:
    """The request's ``MM_CANCEL_KEY`` (checked), or None when the caller sent none."""
    tensor = pb_utils.get_input_tensor_by_name(request, CANCEL_KEY_INPUT)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"{CANCEL_KEY_INPUT}: expected one value, got {values.size}")
    raw = values[0]
    return check_cancel_key(raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw))


def either(*probes: Callable[[], bool] | None) -> Callable[[], bool]:
    """One probe, true when any of ``probes`` is (None entries ignored)."""
    live = [p for p in probes if p is not None]
    return live[0] if len(live) == 1 else (lambda: any(p() for p in live))
