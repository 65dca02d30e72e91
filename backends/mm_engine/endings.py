"""Why a sequence ends early: the probes the loop runs between steps and the messages clients see."""

from __future__ import annotations

import logging
from typing import Any

from .api import EngineError, ErrorCause
from .sequence import Sequence

log = logging.getLogger(__name__)

_END_MESSAGES = {
    ErrorCause.CANCELLED: "request {id} was cancelled",
    ErrorCause.DEADLINE: "request {id} passed its deadline",
    ErrorCause.QUEUE_TIMEOUT: "request {id} waited more than max_queue_delay_s {delay} s for a batch slot",
}


def end_message(cause: ErrorCause, request_id: str, delay_s: float) -> str:
    return _END_MESSAGES[cause].format(id=request_id, delay=delay_s)


def probe_end(seq: Sequence, now: float) -> ErrorCause | None:
    """DEADLINE or CANCELLED when the sequence must end now, else None."""
    req = seq.request
    if req.deadline is not None and now >= req.deadline:
        return ErrorCause.DEADLINE
    try:
        if req.cancelled():
            return ErrorCause.CANCELLED
    except Exception:  # noqa: BLE001 - a failing probe never fails the request
        log.debug("cancellation probe of %s raised", seq.id, exc_info=True)
    return None


def step_failed(request_id: str, e: BaseException) -> EngineError:
    """The error a sequence ends with when a model forward raised (the exception chained)."""
    err = EngineError(ErrorCause.INTERNAL, f"request {request_id}: model step failed: {e}")
    err.__cause__ = e
    return err


def checkpoint_eos_ids(hf_model: Any) -> set[int]:
    """The checkpoint's end-of-sequence token ids (generation config first, then the text config)."""
    gen = getattr(hf_model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(hf_model.config.text_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
