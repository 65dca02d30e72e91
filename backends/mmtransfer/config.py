"""One typed configuration object for pools, windows and timeouts.

The source of truth is the model's ``parameters`` in ``config.pbtxt``; environment
variables named ``MM_<FIELD NAME IN CAPITALS>`` override them (for example
``MM_BLOCK_TOKENS=64``), so one repository can be served with other knobs without
editing files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from mm_params import ParamError, Params, resolve_fields

from .enums import Landing, Transport, WindowPolicyKind
from .errors import ConfigError

MIN_SECRET_CHARS = 16


@dataclass(frozen=True)
class TransferConfig:
    """Knobs of one endpoint (an encoder or a language model instance).

    use_block_allocator: True = free-list of blocks sized by the actual length;
        False = the index-based baseline, one fixed max-size slot per request.
    block_tokens: tokens per block (default 128).
    default_window_tokens: the receiver's default receive window (default 1024).
    pool_blocks: blocks preallocated per instance (default 64).
    max_embed_tokens: the largest embedding one image may produce; also the fixed
        slot size of the sender in fixed-slot mode.
    use_size_hint: the receiver shrinks its window to the EMBED_REF's length hint
        when that is smaller than the default window (never larger), saving blocks.
    window_policy: "fixed" (the default window) or "adaptive" (a percentile of recently
        received lengths, bounded by adaptive_max_window_tokens; see window.py).
    alloc_timeout_s: how long an allocation waits for free blocks (backpressure).
    pull_timeout_s: how long the receiver waits for one reply from the sender.
    pull_wait_s: how long the sender holds a pull for a reserved embedding that is
        not written yet.
    ttl_s: an embedding not pulled to completion within this time is reclaimed.
    control_host: interface the sender's control endpoint binds to (loopback by default).
    control_port: 0 picks a free port.
    advertise_host: address receivers use to reach this endpoint (default: control_host).
    transport: how chunk bytes move: "auto" (both pools on the CPU of one host -> shm, falling back
        to host where the sender's pool cannot be mapped; either pool on the CPU otherwise -> host;
        same GPU -> cuda_ipc; different GPUs -> nccl), or forced: "host", "shm", "nccl", "cuda_ipc".
        Both ends must agree: a forced transport the other end cannot use is a clear error.
    gpu_landing: where GPU transports put received bytes: "direct" (straight into the assembled
        embedding: the CHUNK header, which carries the total length, always arrives before the
        bytes; the window is the flow-control credit) or "window" (into the window's blocks, then
        copied out, like the host transport).
    bootstrap_timeout_s: how long forming a channel (NCCL communicator, IPC or shm mapping) may take.
    max_unread_tokens: the sender's bound on chunk bytes queued to one receiver connection that it has
        not confirmed read (a receiver's next PULL or DONE confirms), in tokens of its pool; beyond it a
        PULL is answered ERROR(busy) and nothing is queued. 0 = two default windows.
    max_sockets: the receiver's bound on connections to sender endpoints (each a file descriptor), in
        use and idle; idle ones are closed least recently used first, and a pull that would need one
        more while all are in use fails at once (SocketsExhausted).
    shared_secret: optional; when set (at least 16 characters, the same on every encoder and
        language instance), every control frame carries an HMAC-SHA256 with it and frames
        without a valid one are refused: it authenticates peers, it does not encrypt. Best set
        with the environment variable MM_SHARED_SECRET (never printed: repr=False).
    """

    use_block_allocator: bool = True
    block_tokens: int = 128
    default_window_tokens: int = 1024
    pool_blocks: int = 64
    max_embed_tokens: int = 8192
    use_size_hint: bool = True
    window_policy: WindowPolicyKind = WindowPolicyKind.FIXED
    adaptive_percentile: float = 90.0
    adaptive_max_window_tokens: int = 8192
    adaptive_history: int = 512
    adaptive_min_samples: int = 16
    alloc_timeout_s: float = 10.0
    pull_timeout_s: float = 30.0
    pull_wait_s: float = 10.0
    ttl_s: float = 120.0
    control_host: str = "127.0.0.1"
    control_port: int = 0
    advertise_host: str = ""
    transport: Transport = Transport.AUTO
    gpu_landing: Landing = Landing.DIRECT
    bootstrap_timeout_s: float = 120.0
    max_unread_tokens: int = 0
    max_sockets: int = 64
    shared_secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _check_range("block_tokens", self.block_tokens, 1, 1 << 16)
        _check_range("default_window_tokens", self.default_window_tokens, 1, 1 << 24)
        _check_range("pool_blocks", self.pool_blocks, 1, 1 << 24)
        _check_range("max_embed_tokens", self.max_embed_tokens, 1, 1 << 24)
        _check_range("control_port", self.control_port, 0, 65535)
        _check_range("adaptive_max_window_tokens", self.adaptive_max_window_tokens, 1, 1 << 24)
        _check_range("max_unread_tokens", self.max_unread_tokens, 0, 1 << 24)
        _check_range("max_sockets", self.max_sockets, 1, 1 << 16)
        _check_range("adaptive_history", self.adaptive_history, 1, 1 << 20)
        _check_range("adaptive_min_samples", self.adaptive_min_samples, 1, 1 << 20)
        _coerce(self, "window_policy", WindowPolicyKind)
        if not 0 < self.adaptive_percentile <= 100:
            raise ConfigError(f"adaptive_percentile must be in (0, 100], got {self.adaptive_percentile!r}")
        _coerce(self, "transport", Transport)
        _coerce(self, "gpu_landing", Landing)
        for name in ("alloc_timeout_s", "pull_timeout_s", "pull_wait_s", "ttl_s", "bootstrap_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 86400):
                raise ConfigError(f"{name} must be in (0, 86400] seconds, got {value!r}")
        if not self.control_host:
            raise ConfigError("control_host must not be empty")
        if not isinstance(self.shared_secret, str) or (
            self.shared_secret
            and (
                len(self.shared_secret) < MIN_SECRET_CHARS
                or len(self.shared_secret) > 4096
                or any(not " " < c <= "~" for c in self.shared_secret)
            )
        ):
            raise ConfigError(
                f"shared_secret must be empty (no authentication) or {MIN_SECRET_CHARS} to 4096 "
                "printable characters without spaces (e.g. `openssl rand -hex 32`)"
            )

    @property
    def auth_key(self) -> bytes | None:
        """The HMAC key of the control channel, or None when no shared secret is set."""
        return self.shared_secret.encode() if self.shared_secret else None

    @property
    def window_blocks(self) -> int:
        """Blocks in the default receive window (rounded up to whole blocks)."""
        return math.ceil(self.default_window_tokens / self.block_tokens)

    @property
    def unread_bound_tokens(self) -> int:
        """Tokens of chunks a sender queues to one receiver before it confirmed reading them."""
        return self.max_unread_tokens or 2 * self.default_window_tokens

    @property
    def max_embed_blocks(self) -> int:
        return math.ceil(self.max_embed_tokens / self.block_tokens)

    @property
    def reachable_host(self) -> str:
        return self.advertise_host or self.control_host

    def replace(self, **changes: Any) -> TransferConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(
        cls, params: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
    ) -> TransferConfig:
        """Build from string parameters (config.pbtxt), then apply ``MM_*`` overrides from env
        (resolved by :mod:`mm_params`, the resolver every model uses).

        Unknown parameter names are ignored here (models carry other parameters too);
        a known name with a malformed value raises ConfigError naming it.
        """
        try:
            return cls(**resolve_fields(cls, Params(params, env)))
        except ParamError as exc:
            raise ConfigError(str(exc)) from None


def _coerce(config: TransferConfig, name: str, enum: type) -> None:
    """Store the enum member for a name given as a string (config.pbtxt, env, keyword)."""
    value = getattr(config, name)
    try:
        object.__setattr__(config, name, enum(value))
    except ValueError:
        raise ConfigError(f"{name} must be one of {list(enum.names())}, got {value!r}") from None


def _check_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
