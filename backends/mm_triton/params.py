"""Reading a model's config.pbtxt ``parameters``, its instance's place, and where its checkpoint lives."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from mm_params import Params, tiny_model_dir


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``{"key": {"string_value": "v"}}`` -> ``{"key": "v"}``."""
    raw = model_config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


def resolve_checkpoint(params: Params) -> Path:
    """The checkpoint to load: ``MM_CHECKPOINT`` env, else the ``checkpoint`` parameter, else the tiny
    default built by ``scripts/setup`` (:func:`mm_params.tiny_model_dir`: ``$MM_TINY_MODEL`` or the tree's)."""
    chosen = params.raw("checkpoint")
    path = Path(chosen).expanduser() if chosen else tiny_model_dir(params.env)
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


def instance_index(model_config: Mapping[str, Any], instance_name: str, device_id: int | None = None) -> int:
    """This instance's position (0, 1, ...) among all instances of the model, in config order.

    Triton names instance ``c`` of instance group ``g`` ``<model>_<g>_<c>``; a group listing several
    GPUs has ``count`` instances on each of them (same names), so the GPU's position counts too.
    Used to give every instance its own fixed port (``control_port + index``)."""
    offset = 0
    for group in model_config.get("instance_group") or []:
        count = int(group.get("count", 1) or 1)
        gpus = [int(g) for g in group.get("gpus") or []]
        name = str(group.get("name", ""))
        tail = instance_name[len(name) + 1 :] if name and instance_name.startswith(name + "_") else ""
        if tail.isdigit():
            gpu_pos = gpus.index(device_id) if device_id is not None and device_id in gpus else 0
            return offset + gpu_pos * count + int(tail)
        offset += count * max(1, len(gpus))
    match = re.search(r"_(\d+)$", instance_name)
    return int(match.group(1)) if match else 0
