"""Matplotlib (headless Agg backend) helpers for the benchmark figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | os.PathLike, footer: str = "") -> Path:
    """Save ``fig`` as PNG (with an optional small footer naming the machine) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if footer:
        fig.text(0.005, -0.02, footer, fontsize=6, color="0.4", ha="left", va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path
