"""Incremental detokenization with stop strings, for streaming.

Text is released in deltas that (a) never end inside a UTF-8 character (a byte-level BPE token may
carry half of one: its decode ends in U+FFFD until the rest arrives) and (b) never include a possible
start of a stop string (the tail that could still grow into one is held back). When a stop string
appears, the text is cut before it and the sequence ends. The concatenated deltas plus
:meth:`flush` equal :attr:`text` exactly.

Decoding follows vLLM's offsets scheme: the new text is ``decode(ids[prefix:]) - decode(ids[prefix:read])``,
so each step decodes a few tokens, not the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
#: Tokens of context kept before the unread ones (BPE merges never reach further back).
PREFIX_WINDOW = 6


class IncrementalDetokenizer:
    """One sequence's text so far; feed it each new token id."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._text = ""  # decoded so far (before any stop cut)
        self._emitted = 0  # chars of _text already released
        self.stopped = False  # a stop string was found; _text is cut before it

    @property
    def text(self) -> str:
        """All text released or releasable (stop string removed)."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly releasable text (often "", e.g. mid-character)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new, or an incomplete UTF-8 character: wait for more tokens
        start_search = max(0, len(self._text) - self._hold)
        self._text += new_text[len(prefix_text) :]
        self._prefix = max(self._read, len(self._ids) - PREFIX_WINDOW)
        self._read = len(self._ids)
        if self._stop:
            cut = self._find_stop(start_search)
            if cut is not None:
                self._text = self._text[:cut]
                self.stopped = True
                return self._release(len(self._text))
            return self._release(len(self._text) - self._held_tail())
        return self._release(len(self._text))

    def flush(self) -> str:
        """Release whatever was held back (the sequence ended without completing a stop string)."""
        return self._release(len(self._text))

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_tail(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._text
        for n in range(min(self._hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(list(ids), skip_special_tokens=True)
