"""EngineConfig: the engine's sizing and admission knobs, validated once at load time.

The names users set (config.pbtxt ``parameters`` or ``MM_<NAME>`` env, env wins) follow vLLM where
one exists, so ``max_num_seqs`` is the running-batch bound (``max_batch_size`` here, not to be confused
with Triton's own top-level ``max_batch_size``, which stays 0 for these models).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from mm_params import ParamError, Params, resolve_fields

#: config.pbtxt parameter name (and ``MM_`` + upper-cased env name) of each EngineConfig field.
PARAM_NAMES = {
    "max_batch_size": "max_num_seqs",
    "max_seq_len": "max_seq_len",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "max_queue_size": "max_queue_size",
    "max_queue_delay_s": "max_queue_delay_s",
    "loader_threads": "loader_threads",
    "dtype": "dtype",
}
#: Alternative to ``max_seq_len``: total KV tokens, split evenly over the slots.
KV_CACHE_TOKENS_PARAM = "kv_cache_tokens"
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Sizing of one engine instance.

    ``max_batch_size``: running sequences (= KV slots). ``max_seq_len``: tokens per slot (prompt incl.
    image tokens + generated); the cache holds ``max_batch_size * max_seq_len`` tokens.
    ``max_num_batched_tokens``: prefill tokens per engine step; a longer prompt is prefilled in chunks,
    so a joining request stalls the running decodes for at most one chunk per step.
    ``max_queue_size``: sequences admitted but not yet running (loading images or waiting for a slot);
    more are refused at submit (QUEUE_FULL). ``max_queue_delay_s``: longest wait for a slot once the
    images have landed (QUEUE_TIMEOUT), 0 = no bound. ``loader_threads``: concurrent image loads.
    ``dtype``: "auto" keeps the checkpoint's.
    """

    max_batch_size: int = 32
    max_seq_len: int = 4096
    max_num_batched_tokens: int = 512
    max_queue_size: int = 64
    max_queue_delay_s: float = 30.0
    loader_threads: int = 4
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        for name, low in (
            ("max_batch_size", 1),
            ("max_seq_len", 2),
            ("max_num_batched_tokens", 1),
            ("max_queue_size", 1),
            ("loader_threads", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{PARAM_NAMES.get(name, name)} must be an int >= {low}, got {value!r}")
        delay = self.max_queue_delay_s
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not math.isfinite(delay) or delay < 0:
            problems.append(f"max_queue_delay_s must be a number >= 0, got {delay!r}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if problems:
            raise ValueError("engine config: " + "; ".join(problems))

    @property
    def kv_cache_tokens(self) -> int:
        return self.max_batch_size * self.max_seq_len

    @classmethod
    def from_params(
        cls, params: Mapping[str, str], device: str = "cpu", env: Mapping[str, str] = os.environ
    ) -> EngineConfig:
        """Build from config.pbtxt ``parameters`` (string values) with ``MM_<NAME>`` env overrides (resolved by
        :mod:`mm_params`, the resolver every model uses).

        ``kv_cache_tokens`` may replace ``max_seq_len`` (divided by ``max_num_seqs``); giving both is an
        error unless they agree. ValueError names the offending parameter."""
        source = Params(params, env)
        try:
            kwargs: dict[str, object] = {"device": device, **resolve_fields(cls, source, PARAM_NAMES)}
            total = source.get(KV_CACHE_TOKENS_PARAM, "int", None)
        except ParamError as exc:
            raise ValueError(f"engine config: {exc}") from None
        if total is not None:
            slots = kwargs.get("max_batch_size", cls.max_batch_size)
            per_slot = total // slots if isinstance(slots, int) and slots > 0 else 0
            if "max_seq_len" in kwargs and kwargs["max_seq_len"] != per_slot:
                raise ValueError(
                    f"engine config: kv_cache_tokens {total} / max_num_seqs {slots} = {per_slot} "
                    f"disagrees with max_seq_len {kwargs['max_seq_len']}; give one of them"
                )
            kwargs["max_seq_len"] = per_slot
        return cls(**kwargs)  # type: ignore[arg-type]
