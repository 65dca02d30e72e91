"""Internal models (``mm_encoder``, ``mm_language``, ``mm_language_stream``, ``mm_control``) serve only the public
pipelines.

Triton has no per-model access control, and an ensemble can neither add a constant input nor anything a
client could not send itself (it forwards the client's own inputs and request parameters). So the public pipelines
are small BLS models (:mod:`mm_triton.pipeline`) that add one input, ``MM_INTERNAL_TOKEN``, holding a per-server
secret; an internal model refuses a request without the right value before it reads anything else
(INVALID_ARG, nothing allocated, no connection made).

The per-server secret (:func:`server_token`): the file named by ``MM_INTERNAL_SECRET_FILE`` (a launcher's own; it
must be owned by this user and not readable by group or others), else a file that the first stub of this
tritonserver creates: a random 256-bit value in ``<tmp>/mm-triton-<uid>/`` (a 0700 directory owned by this
user), named after the server's pid and start time (every stub's parent is the server), so it is new for every
server start and needs no launcher.

Across servers (a language server's ``mm_pipeline`` calling a remote encoder server's ``mm_encoder``) the caller
cannot know that secret; when ``shared_secret`` (``MM_SHARED_SECRET``, the control-channel secret) is set, an
internal model also accepts HMAC-SHA256(secret, "mm-internal-call/v1"), which both sides can compute.

No secret is ever in a command line, in an environment variable, in a log line or in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

TOKEN_INPUT = "MM_INTERNAL_TOKEN"
# set by a pipeline whose client cancelled after the encoder step: mm_language frees the embeddings, serves nothing
ABANDON_INPUT = "MM_ABANDON"
SECRET_FILE_ENV = "MM_INTERNAL_SECRET_FILE"
_DERIVE_LABEL = b"mm-internal-call/v1"
_TOKEN_BYTES = 32


class InternalCallRefused(ValueError):
    """A client called an internal model directly (INVALID_ARG at the boundary)."""


def derive_token(shared_secret: str) -> str:
    return hmac.new(shared_secret.encode(), _DERIVE_LABEL, hashlib.sha256).hexdigest()


def private_dir(base: Path) -> Path:
    """``base/mm-triton-<uid>``, created 0700; refused if another user owns it or others can enter it."""
    path = base / f"mm-triton-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory owned by uid {os.getuid()} with mode 0700")
    return path


def _read_private(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{path} must be owned by uid {os.getuid()} and readable by it only (chmod 600)")
        value = os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
    if len(value) < 32:
        raise ValueError(f"{path} holds no secret (at least 32 characters)")
    return value


def process_start(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rfind(")") + 2 :].split()[19]
    except (OSError, IndexError):
        return "0"


def server_key(server_pid: int | None = None) -> str:
    """``<pid>-<start time>`` of the tritonserver (default: this stub's parent): new for every server start."""
    pid = os.getppid() if server_pid is None else server_pid
    return f"{pid}-{process_start(pid)}"


def _prune(directory: Path) -> None:
    """Remove the secrets and endpoint registries of servers that are gone (best effort)."""
    for entry in [*directory.glob("internal-*.key"), *directory.glob("endpoints-*"), *directory.glob("cancel-*")]:
        parts = entry.name.split(".")[0].split("-")
        if len(parts) == 3 and parts[1].isdigit() and process_start(int(parts[1])) != parts[2]:
            if entry.is_dir():
                for child in entry.iterdir():
                    child.unlink(missing_ok=True)
                entry.rmdir()
            else:
                entry.unlink(missing_ok=True)


def per_server_secret(server_pid: int | None = None, base: Path | None = None) -> str:
    """The secret of the tritonserver ``server_pid`` (default: this stub's parent), created once."""
    directory = private_dir(Path(tempfile.gettempdir()) if base is None else base)
    path = directory / f"internal-{server_key(server_pid)}.key"
    if not path.exists():
        # written whole to a temporary name, then linked: a stub racing this one never reads half a file
        tmp = directory / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_hex(_TOKEN_BYTES).encode())
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            _prune(directory)
        except FileExistsError:
            pass  # another stub of this server was first: use its secret
        finally:
            tmp.unlink(missing_ok=True)
    return _read_private(path)


# ---- the registry of this server's encoder endpoints (read by mm_language.trust) ---------------------------
def server_dir(kind: str, server_pid: int | None = None, base: Path | None = None) -> Path:
    """``<private dir>/<kind>-<server key>``, created 0700: a running server's files of one kind."""
    root = private_dir(Path(tempfile.gettempdir()) if base is None else base)
    directory = root / f"{kind}-{server_key(server_pid)}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def registry_dir(server_pid: int | None = None, base: Path | None = None) -> Path:
    return server_dir("endpoints", server_pid, base)


def register_endpoint(address: str, directory: Path | None = None) -> None:
    """Record ``address`` (``tcp://host:port``) as an encoder endpoint of this server (idempotent)."""
    directory = registry_dir() if directory is None else directory
    name = hashlib.sha256(address.encode()).hexdigest()[:32]
    tmp = directory / f".{name}.{os.getpid()}"
    tmp.write_text(address)
    os.replace(tmp, directory / name)


def server_token(env: Mapping[str, str] = os.environ) -> str:
    """The per-server token the public pipelines send to this server's internal models (see the module doc)."""
    chosen = env.get(SECRET_FILE_ENV, "")
    if chosen:
        return _read_private(Path(chosen))
    return per_server_secret()


def token_of_server(server_pid: int) -> str:
    """The per-server token of a running tritonserver, read from outside it by a process of the same user (the
    watchdog, scripts/serve): the server's ``MM_INTERNAL_SECRET_FILE`` if its environment names one (a path, not a
    secret), else its per-server file."""
    try:
        environ = Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0")
    except OSError:
        environ = []
    prefix = SECRET_FILE_ENV.encode() + b"="
    for item in environ:
        if item.startswith(prefix) and len(item) > len(prefix):
            return _read_private(Path(item[len(prefix) :].decode()))
    return per_server_secret(server_pid)


def write_token_file(server_pid: int, name: str) -> Path:
    """Write the server's token into ``<private dir>/<name>`` (0600) for a trusted co-process (the OpenAI front
    end's direct route) and return the path; rewritten in place when the server was restarted."""
    path = private_dir(Path(tempfile.gettempdir())) / name
    tmp = path.with_name(f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token_of_server(server_pid).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def token_tensor(pb_utils: Any, token: str) -> Any:
    return pb_utils.Tensor(TOKEN_INPUT, np.array([token.encode()], dtype=np.object_))


class InternalGate:
    """Refuses requests to an internal model that do not carry the server's token.

    Parameter ``internal_access`` (``MM_INTERNAL_ACCESS``): ``closed`` (the default), ``open``, or
    ``shared_secret``: closed only when a shared secret is configured. The last is the default of a split
    encoder server's ``mm_encoder``, which language servers call over the network: without a shared secret
    they have no way to learn a token (docs/RELIABILITY.md)."""

    def __init__(self, model_name: str, *tokens: str) -> None:
        self.model_name = model_name
        self._tokens = [t.encode() for t in tokens if t]  # none: open

    @classmethod
    def for_model(cls, model_name: str, params: Mapping[str, str], shared_secret: str) -> InternalGate:
        mode = (os.environ.get("MM_INTERNAL_ACCESS") or params.get("internal_access") or "closed").lower()
        if mode not in ("closed", "shared_secret", "open"):
            raise ValueError(f"parameter internal_access: {mode!r} is not closed, shared_secret or open")
        if mode == "open" or (mode == "shared_secret" and not shared_secret):
            log.warning("%s: internal_access=%s: clients may call this model directly", model_name, mode)
            return cls(model_name)
        return cls(model_name, server_token(), derive_token(shared_secret) if shared_secret else "")

    @property
    def closed(self) -> bool:
        return bool(self._tokens)

    def allows(self, pb_utils: Any, request: Any) -> bool:
        if not self._tokens:
            return True
        tensor = pb_utils.get_input_tensor_by_name(request, TOKEN_INPUT)
        if tensor is None:
            return False
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1 or not isinstance(values[0], (bytes, bytearray)):
            return False
        given = bytes(values[0])
        return any([hmac.compare_digest(given, token) for token in self._tokens])  # no short cut: constant time

    def check(self, pb_utils: Any, request: Any) -> None:
        if not self.allows(pb_utils, request):
            raise InternalCallRefused(
                f"{self.model_name} is an internal model and does not serve client requests: "
                "send them to the public pipeline (mm_pipeline or mm_pipeline_stream)"
            )
