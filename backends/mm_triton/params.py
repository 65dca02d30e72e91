"""Reading a model's config.pbtxt ``parameters`` and resolving where its checkpoint lives."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

TINY_MODEL_RELPATH = Path(".cache/models/tiny-qwen2-vl")


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``{"key": {"string_value": "v"}}`` -> ``{"key": "v"}``."""
    raw = model_config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


def resolve_checkpoint(params: Mapping[str, str], model_dir: str | Path, env: Mapping[str, str] = os.environ) -> Path:
    """The checkpoint to load: ``MM_CHECKPOINT`` env, else the ``checkpoint`` parameter,
    else the tiny default built by ``scripts/setup`` next to the model repository."""
    chosen = env.get("MM_CHECKPOINT") or params.get("checkpoint") or ""
    if chosen:
        path = Path(chosen).expanduser()
    else:
        path = Path(model_dir).resolve().parents[1] / TINY_MODEL_RELPATH
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (config.json missing): run scripts/setup to build the tiny default, "
            "or point MM_CHECKPOINT / the 'checkpoint' parameter at a local Qwen2-VL directory"
        )
    return path


def instance_device(args: Mapping[str, str]) -> str:
    """``cuda:N`` for a KIND_GPU instance, else ``cpu``."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"
