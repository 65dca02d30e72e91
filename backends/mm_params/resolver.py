"""Resolve a model parameter: ``MM_<NAME>`` in the environment wins over config.pbtxt's ``parameters``
(so one repository can be served with other knobs without editing files); an empty value counts as unset.

    params = Params(model_parameters(model_config))        # env: os.environ unless given
    params.int("encode_threads", 0, low=0)                 # MM_ENCODE_THREADS, else the parameter, else 0
    values = resolve_fields(TransferConfig, params)        # every dataclass field that is set, parsed

A malformed value raises :class:`ParamError` (a ValueError) naming the parameter, the environment variable
when that is where the value came from, and the value.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "MM_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
#: Where scripts/setup builds the tiny checkpoint, relative to the repository root.
TINY_MODEL_RELPATH = Path(".cache") / "models" / "tiny-qwen2-vl"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class ParamError(ValueError):
    """A parameter value that cannot be parsed or is out of range."""


def env_name(name: str) -> str:
    """The environment variable overriding parameter ``name``: ``MM_`` + its name in capitals."""
    return ENV_PREFIX + name.upper()


def parse_value(name: str, kind: str, raw: str) -> Any:
    """``raw`` as ``kind`` ("int", "float", "bool"; anything else stays a stripped string)."""
    text = raw.strip()
    try:
        if kind == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ParamError(f"parameter {name}: cannot parse {raw!r} as {kind}") from None
    return text


class Params:
    """One model's parameters with their environment overrides."""

    def __init__(self, params: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.params = dict(params or {})
        self.env = os.environ if env is None else env

    def raw(self, name: str) -> str | None:
        """The value of ``name`` as a string (environment first), None when neither sets it."""
        value = self.env.get(env_name(name))
        if value in (None, ""):
            value = self.params.get(name)
        return None if value in (None, "") else str(value)

    def source(self, name: str) -> str:
        """Where the value of ``name`` comes from, for error messages."""
        if self.env.get(env_name(name)) not in (None, ""):
            return f"{env_name(name)} (environment)"
        return f"parameter {name}" if self.params.get(name) not in (None, "") else "default"

    def get(self, name: str, kind: str, default: Any) -> Any:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            return parse_value(name, kind, raw)
        except ParamError:
            raise ParamError(f"{self.source(name)}: cannot parse {raw!r} as {kind}") from None

    def int(self, name: str, default: int, low: int | None = None, high: int | None = None) -> int:
        value = self.get(name, "int", default)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise ParamError(f"{self.source(name)}: {value} is outside {bounds}")
        return value

    def float(self, name: str, default: float, low: float | None = None, high: float | None = None) -> float:
        value = self.get(name, "float", default)
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            raise ParamError(f"{self.source(name)}: {value} is outside [{low}, {high}]")
        return value

    def bool(self, name: str, default: bool) -> bool:
        return self.get(name, "bool", default)

    def str(self, name: str, default: str) -> str:
        return self.get(name, "str", default)


def resolve_fields(cls: type, params: Params, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{field: parsed value}`` of the fields of dataclass ``cls`` that the parameters or the environment set.

    ``names`` maps a field to its parameter name where they differ (default: the field's own name); fields
    not in ``names`` are resolved under their own name unless ``names`` is given, then only those listed.
    Unknown parameter names are ignored (models carry other parameters too)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        param = names[f.name] if names is not None else f.name
        raw = params.raw(param)
        if raw is None:
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        out[f.name] = params.get(param, kind, None)
    return out


def tiny_model_dir(env: Mapping[str, str] | None = None) -> Path:
    """The tiny Qwen2-VL checkpoint built by scripts/setup: ``$MM_TINY_MODEL``, else
    ``<repository root>/.cache/models/tiny-qwen2-vl``."""
    env = os.environ if env is None else env
    value = env.get("MM_TINY_MODEL")
    return Path(value).expanduser() if value else _REPO_ROOT / TINY_MODEL_RELPATH
