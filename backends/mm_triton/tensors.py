"""Reading request inputs with clear errors instead of crashes on odd shapes or dtypes."""

from __future__ import annotations

from typing import Any

import numpy as np


def bytes_list(pb_utils: Any, request: Any, name: str, *, required: bool = True) -> list[bytes]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"input {name} is required")
        return []
    array = tensor.as_numpy()
    if array.dtype != np.object_:
        raise ValueError(f"input {name} must be BYTES, got {array.dtype}")
    return [bytes(x) if isinstance(x, (bytes, bytearray)) else str(x).encode() for x in array.reshape(-1)]


def one_string(pb_utils: Any, request: Any, name: str) -> str:
    values = bytes_list(pb_utils, request, name)
    if len(values) != 1:
        raise ValueError(f"input {name} must hold exactly one string, got {len(values)}")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"input {name} is not valid UTF-8") from None


def optional_int(pb_utils: Any, request: Any, name: str) -> int | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"input {name} must be one integer, got shape {array.shape} of {array.dtype}")
    return int(array[0])


def _optional_scalar(pb_utils: Any, request: Any, name: str, kind: Any, what: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1 or not np.issubdtype(array.dtype, kind):
        raise ValueError(f"input {name} must be one {what}, got shape {array.shape} of {array.dtype}")
    return array[0]


def optional_bool(pb_utils: Any, request: Any, name: str) -> bool | None:
    value = _optional_scalar(pb_utils, request, name, np.bool_, "boolean")
    return None if value is None else bool(value)


def optional_float(pb_utils: Any, request: Any, name: str) -> float | None:
    value = _optional_scalar(pb_utils, request, name, np.floating, "number")
    if value is None:
        return None
    if not np.isfinite(value):
        raise ValueError(f"input {name} must be a finite number, got {value}")
    return float(value)


def optional_strings(pb_utils: Any, request: Any, name: str) -> list[str]:
    """A BYTES input of UTF-8 strings; [] when absent."""
    out = []
    for i, raw in enumerate(bytes_list(pb_utils, request, name, required=False)):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"input {name}[{i}] is not valid UTF-8") from None
    return out
