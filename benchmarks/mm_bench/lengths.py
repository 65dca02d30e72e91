"""Embedding-length mixes: how many tokens each image of a workload gives.

A log-normal (median, sigma) clipped to [min_tokens, max_tokens] is the default shape: image
embedding lengths are positive and right-skewed (many photos of a few hundred tokens, a tail of
documents and large screenshots of several thousand). The default mix (median 800, sigma 0.75,
[64, 8192]) has p50 800, p90 ~2100, p99 ~4600 tokens and ~37 % of images above the default
1024-token receive window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LogNormalMix:
    median: float = 800.0
    sigma: float = 0.75
    min_tokens: int = 64
    max_tokens: int = 8192

    def __post_init__(self) -> None:
        if not self.median > 0 or not self.sigma >= 0:
            raise ValueError(f"median must be > 0 and sigma >= 0, got {self.median}, {self.sigma}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` integer lengths (int64), reproducible for a seed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(seed)
        raw = self.median * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.round(raw), self.min_tokens, self.max_tokens).astype(np.int64)

    def stratified(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` lengths at the mix's quantiles (i + 0.5) / n, in a seeded random order: a small set that
        still spans the distribution (24 images: ~170 ... ~3700 tokens for the default mix), unlike a
        random draw of the same size, whose tail is hit or miss."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        values = np.array([round(self.quantile((i + 0.5) / n)) for i in range(n)], dtype=np.int64)
        return np.random.default_rng(seed).permutation(values)

    def quantile(self, q: float) -> float:
        """The mix's q-quantile (0 < q < 1) before rounding, clipping included."""
        from statistics import NormalDist

        value = self.median * math.exp(self.sigma * NormalDist().inv_cdf(q))
        return float(min(max(value, self.min_tokens), self.max_tokens))

    def describe(self) -> str:
        return (
            f"log-normal(median {self.median:g}, sigma {self.sigma:g}) tokens, clipped to "
            f"[{self.min_tokens}, {self.max_tokens}]"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> LogNormalMix:
        """``"median,sigma[,min,max]"`` (the scripts' --mix option)."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) not in (2, 4):
            raise ValueError(f"--mix wants 'median,sigma' or 'median,sigma,min,max', got {text!r}")
        median, sigma = float(parts[0]), float(parts[1])
        if len(parts) == 4:
            return cls(median, sigma, int(parts[2]), int(parts[3]))
        return cls(median, sigma)


def summarize(lengths) -> dict:
    """Count, mean, percentiles and share above the default window of a length sample."""
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        return {"count": 0}
    p = np.percentile(arr, [10, 50, 90, 99])
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "min": int(arr.min()),
        "max": int(arr.max()),
        "p10": float(p[0]),
        "p50": float(p[1]),
        "p90": float(p[2]),
        "p99": float(p[3]),
        "share_above_1024": float((arr > 1024).mean()),
    }
