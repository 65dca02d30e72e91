"""Offline-only access to transformers: model directories are local, the hub is never contacted.

Import this module before ``transformers`` is imported anywhere in the process so that the
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` defaults take effect; every loader in this package also
passes ``local_files_only=True`` so the guarantee holds even when transformers was imported earlier.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


def model_dir(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a resolved directory that holds a checkpoint ``config.json``.

    Raises ValueError when it is not a local directory or has no ``config.json``: a string that looks
    like a hub repository id is rejected here rather than looked up online.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"model directory {str(p)!r} does not exist or is not a directory "
            "(only local checkpoint directories are supported; the model hub is never used)"
        )
    if not (p / CONFIG_FILE).is_file():
        raise ValueError(f"model directory {str(p)!r} has no {CONFIG_FILE}: not a checkpoint directory")
    return p.resolve()


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; ValueError if missing or malformed."""
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"missing file {str(path)!r}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"file {str(path)!r} does not hold a JSON object")
    return data


def resolve_dtype(dtype: Any, default: Any = "auto") -> Any:
    """Map a user dtype (None, torch.dtype or a name such as "bfloat16") to what from_pretrained takes.

    None means the checkpoint's own dtype ("auto").
    """
    import torch

    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"unsupported dtype {dtype!r}; use a torch.dtype or a name like 'bfloat16'")
