"""Per-sequence timestamps inside the engine and the phases they split a request's time into.

The engine stamps a :class:`SequenceTiming` as a sequence moves (``time.monotonic()`` values) and hands it
to :meth:`~mm_engine.stats.EngineObserver.on_sequence_timing` when the sequence finished normally. The
arithmetic lives here, free of threads and Triton, so it is unit-tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SequenceTiming:
    """When one sequence passed each point; None where it did not (a text-only request never loads)."""

    request_id: str
    arrival: float  # submit
    load_started: float | None = None  # a loader thread began its ImageLoader.load
    load_ended: float | None = None  # load returned (or raised)
    admitted: float | None = None  # got a KV slot (prefill starts)
    first_token: float | None = None  # prefill done, first token sampled
    finished: float | None = None  # last token appended

    def phases(self) -> dict[str, float]:
        """Seconds per engine phase, keyed ``queue`` (submit -> a loader thread picked it up), ``load``
        (the ImageLoader: pulls, or the vision tower in the monolithic model), ``slot_wait`` (ready ->
        a KV slot), ``prefill`` (slot -> first token) and ``decode`` (first -> last token). A phase
        whose end points are missing is left out; a negative span (clock misuse) becomes 0."""
        out: dict[str, float] = {}
        ready = self.arrival
        if self.load_started is not None and self.load_ended is not None:
            out["queue"] = _span(self.arrival, self.load_started)
            out["load"] = _span(self.load_started, self.load_ended)
            ready = self.load_ended
        if self.admitted is not None:
            out["slot_wait"] = _span(ready, self.admitted)
            if self.first_token is not None:
                out["prefill"] = _span(self.admitted, self.first_token)
        if self.first_token is not None and self.finished is not None:
            out["decode"] = _span(self.first_token, self.finished)
        return out


def _span(start: float, end: float) -> float:
    return max(0.0, end - start)
