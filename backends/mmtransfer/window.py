"""How many blocks a receiver offers for a pull: a fixed default, or adaptive.

The fixed policy offers ``default_window_tokens`` (shrunk to the EMBED_REF's
length hint when that is smaller). The adaptive policy learns from the lengths it
has received: it offers a high percentile of recent lengths, bounded, so that most
embeddings arrive in one chunk without holding blocks that are rarely filled.
"""

from __future__ import annotations

import math
import threading
from collections import deque

from .config import TransferConfig
from .enums import WindowPolicyKind


class WindowPolicy:
    """Fixed default window; subclasses adapt it. Thread-safe."""

    def __init__(self, config: TransferConfig) -> None:
        self.config = config

    def window_tokens(self, hint_tokens: int = 0) -> int:
        """Tokens to offer for the next pull, before rounding up to whole blocks."""
        tokens = self.base_tokens()
        if self.config.use_size_hint and hint_tokens > 0:
            tokens = min(tokens, hint_tokens)
        return tokens

    def window_blocks(self, hint_tokens: int = 0) -> int:
        return max(1, math.ceil(self.window_tokens(hint_tokens) / self.config.block_tokens))

    def base_tokens(self) -> int:
        return self.config.default_window_tokens

    def observe(self, total_tokens: int) -> None:
        """Record the length of an embedding that arrived."""


class AdaptiveWindow(WindowPolicy):
    """Offers the ``adaptive_percentile`` of the last ``adaptive_history`` lengths, clamped
    to ``[block_tokens, adaptive_max_window_tokens]``; the default window until
    ``adaptive_min_samples`` lengths were seen."""

    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config)
        self._lengths: deque[int] = deque(maxlen=config.adaptive_history)
        self._lock = threading.Lock()
        self._cached: int | None = None

    def observe(self, total_tokens: int) -> None:
        with self._lock:
            self._lengths.append(total_tokens)
            self._cached = None

    def base_tokens(self) -> int:
        with self._lock:
            if len(self._lengths) < self.config.adaptive_min_samples:
                return self.config.default_window_tokens
            if self._cached is None:
                ordered = sorted(self._lengths)
                rank = math.ceil(self.config.adaptive_percentile / 100 * len(ordered)) - 1
                value = ordered[min(max(rank, 0), len(ordered) - 1)]
                self._cached = min(max(value, self.config.block_tokens), self.config.adaptive_max_window_tokens)
            return self._cached


def make_window_policy(config: TransferConfig) -> WindowPolicy:
    return AdaptiveWindow(config) if config.window_policy is WindowPolicyKind.ADAPTIVE else WindowPolicy(config)
