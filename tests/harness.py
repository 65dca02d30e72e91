"""Start and stop a real ``tritonserver`` (2.51, from the nvidia-pytriton wheel) for tests and scripts.

    from harness import TritonServer, parse_metrics, metric_value

    with TritonServer(model_repository, env={"MM_POOL_BLOCKS": "8"}) as server:
        client = tritonclient.http.InferenceServerClient(server.http_address)
        ...
        metrics = parse_metrics(server.metrics_text())
        metric_value(metrics, "nv_inference_request_success", model="mm_pipeline")

The server gets free ports (unless given), logs to a file, and is ready when ``/v2/health/ready`` answers
200 (all models loaded). A server that dies or is not ready in time raises ``TritonStartError`` with the tail
of its log. ``stop()`` sends SIGTERM, then SIGKILL to the whole process group (tritonserver and its Python
stubs) after a grace period. A server is never left behind: ``stop()`` runs on ``__exit__``, at interpreter
exit (atexit), and the server's process gets SIGTERM when the process that started it dies
(PR_SET_PDEATHSIG), even if that one is SIGKILLed.

Paths come from the same variables as scripts/env.sh (TRITONSERVER, MM_BACKEND_DIR), with the same
defaults computed here when the variables are not set. scripts/setup must have run (it assembles the
backend directory).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"

__all__ = [
    "REPO_ROOT",
    "DEFAULT_MODEL_REPOSITORY",
    "TritonServer",
    "TritonStartError",
    "free_port",
    "port_is_free",
    "find_tritonserver",
    "find_backend_dir",
    "server_env",
    "libpython_dir",
    "parse_metrics",
    "metric_value",
    "write_python_model",
    "write_identity_repo",
    "write_fake_pipeline_repo",
]


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with its log tail."""


# --------------------------------------------------------------------------------------------- paths
def _site_packages() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed in this Python; run scripts/setup")
    return Path(list(spec.submodule_search_locations)[0]).parent


def find_tritonserver() -> Path:
    """$TRITONSERVER, else the binary inside the installed nvidia-pytriton wheel."""
    env = os.environ.get("TRITONSERVER")
    path = Path(env) if env else _site_packages() / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not os.access(path, os.X_OK):
        raise TritonStartError(f"tritonserver not found or not executable: {path} (run scripts/setup)")
    return path


def find_backend_dir() -> Path:
    """$MM_BACKEND_DIR, else <repo>/.cache/triton/backends (assembled by scripts/setup)."""
    env = os.environ.get("MM_BACKEND_DIR")
    cache = Path(os.environ.get("MM_CACHE", REPO_ROOT / ".cache"))
    path = Path(env) if env else cache / "triton" / "backends"
    stub = path / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"no Triton Python backend in {path} (missing {stub.name}); run scripts/setup")
    return path


def libpython_dir() -> Path | None:
    """The directory of this interpreter's own libpythonX.Y.so.1.0, if it is a shared build.

    The Python-backend stub embeds libpythonX.Y.so.1.0 but runs the venv's base interpreter's stdlib; a
    different CPython build of the same X.Y (e.g. Debian's 3.11.2 libpython under a pyenv 3.11.7 stdlib)
    fails with "undefined symbol: _PyModule_Add" as soon as a model imports ssl. Putting this directory on
    LD_LIBRARY_PATH makes the stub load the matching libpython (same rule as scripts/env.sh)."""
    import sysconfig

    name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    candidates = [sysconfig.get_config_var("LIBDIR"), str(Path(sys.base_prefix) / "lib")]
    for d in candidates:
        if d and (Path(d) / name).exists():
            if d.startswith(("/usr/lib", "/lib")):
                return None  # the system's own: found by default, don't reorder system libraries
            return Path(d)
    return None


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver needs: venv bin first on PATH (the Python stub finds its environment
    through `python3` on PATH; PYTHONPATH is not honoured) and the wheel's libraries on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    site = _site_packages()
    venv_bin = str(Path(sys.prefix) / "bin")

    def prepend(var: str, *dirs: str) -> None:
        parts = [p for p in env.get(var, "").split(":") if p and p not in dirs]
        env[var] = ":".join([*dirs, *parts])

    prepend("PATH", venv_bin)
    lib_dirs = [str(site / "nvidia_pytriton.libs")]
    libpython = libpython_dir()
    if libpython:
        lib_dirs.append(str(libpython))
    lib_dirs.append(str(site / "nvidia" / "cuda_runtime" / "lib"))
    prepend("LD_LIBRARY_PATH", *lib_dirs)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("PYTHONPATH", None)  # not honoured by the stub anyway; keep the server and stubs alike
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------------------------- ports
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on the port now (nothing listens; TIME_WAIT leftovers don't count,
    as servers, tritonserver included, bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _distinct_free_ports(n: int, host: str) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(host)
        if p not in ports:
            ports.append(p)
    return ports


# --------------------------------------------------------------------------------- process handling
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int, die_with_parent: bool) -> None:  # runs in the child before exec
    os.setsid()  # own process group: stop() can reach the Python stubs too; Ctrl-C goes to the parent only
    if die_with_parent:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except Exception:
            pass
        if os.getppid() != parent_pid:  # parent already gone
            os._exit(1)


def _group_members(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces/parens
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


_ERROR_LINE = re.compile(r"^E\d{4} ")
_HARMLESS = (  # errors Triton logs on a machine without a GPU, whatever the models do
    "CudaDriverHelper has not been initialized",
    "unable to create stream for",
)

_LIVE: set["TritonServer"] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        try:
            s.stop()
        except Exception:
            pass


class TritonServer:
    """A real tritonserver process. Use as a context manager, or ``start()`` / ``stop()``.

    model_repository: a directory, or several (each becomes one --model-repository); default model_repository/.
    env:              extra environment variables for the server and its Python stubs (e.g. MM_* overrides).
    args:             extra tritonserver arguments (e.g. ["--log-verbose=1"]).
    http_port, grpc_port, metrics_port: fixed ports; None picks free ones (retrying if one gets taken).
    host:             address to bind and to reach the server at (127.0.0.1; "0.0.0.0" binds all and is
                      reached at 127.0.0.1).
    log_file:         where the server's output goes (default: a new file under the system temp dir).
    startup_timeout_s: how long to wait for /v2/health/ready.
    stop_timeout_s:   grace period between SIGTERM and SIGKILL.
    exit_timeout_s:   passed as --exit-timeout-secs (how long Triton waits for in-flight requests).
    die_with_parent:  the server gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG):
                      start servers from the main thread or a thread that lives as long as they do.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_file: str | os.PathLike | None = None,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 20.0,
        exit_timeout_s: int = 5,
        backend_dir: str | os.PathLike | None = None,
        tritonserver: str | os.PathLike | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if model_repository is None:
            repos = [DEFAULT_MODEL_REPOSITORY]
        elif isinstance(model_repository, (str, os.PathLike)):
            repos = [Path(model_repository)]
        else:
            repos = [Path(r) for r in model_repository]
        self.model_repositories = [r.resolve() for r in repos]
        self.extra_env = dict(env or {})
        self.extra_args = list(args)
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.host = host
        self.connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.backend_dir = Path(backend_dir) if backend_dir else None
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.die_with_parent = die_with_parent
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    # ------------------------------------------------------------------------------- addresses
    @property
    def http_address(self) -> str:
        """host:port, as tritonclient.http wants it."""
        return f"{self.connect_host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc wants it."""
        return f"{self.connect_host}:{self.grpc_port}"

    grpc_address = grpc_url

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<TritonServer {self.http_address} {state} repo={[str(r) for r in self.model_repositories]}>"

    # ------------------------------------------------------------------------------------ life
    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self) -> list[str]:
        cmd = [str(self.tritonserver or find_tritonserver())]
        for repo in self.model_repositories:
            cmd.append(f"--model-repository={repo}")
        cmd += [
            f"--backend-directory={self.backend_dir or find_backend_dir()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        return cmd + self.extra_args

    def start(self) -> "TritonServer":
        if self.is_running():
            return self
        for repo in self.model_repositories:
            if not repo.is_dir():
                raise TritonStartError(f"model repository not found: {repo}")
        auto_ports = None in self._fixed_ports
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            picked = iter(_distinct_free_ports(3, self.connect_host))
            self.http_port, self.grpc_port, self.metrics_port = (p if p else next(picked) for p in self._fixed_ports)
            try:
                self._launch_and_wait()
                return self
            except TritonStartError as e:
                port_clash = "address already in use" in str(e).lower() or "failed to start" in str(e).lower()
                if attempt + 1 < attempts and port_clash:
                    continue
                raise

    def _launch_and_wait(self) -> None:
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_file, "ab")
        self._log_offset = self._log_fh.tell()
        cmd = self.command()
        self._log_fh.write(("$ " + " ".join(cmd) + "\n").encode())
        self._log_fh.flush()
        parent = os.getpid()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=server_env(self.extra_env),
            cwd=str(REPO_ROOT),
            preexec_fn=lambda: _child_setup(parent, self.die_with_parent),
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_address}/v2/health/ready"
        while True:
            rc = self.proc.poll() if self.proc else None
            if rc is not None:
                time.sleep(0.1)  # let the last log lines land
                raise TritonStartError(
                    f"tritonserver exited with code {rc} before it was ready "
                    f"(log: {self.log_file})\n{self.failure_report()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver not ready after {timeout_s:g} s (log: {self.log_file})\n{self.failure_report()}"
                )
            time.sleep(0.2)

    def stop(self) -> int | None:
        """Stop the server (idempotent). Returns its exit code (negative: killed by that signal)."""
        proc = self.proc
        if proc is None:
            return None
        pgid = proc.pid  # setsid() in the child: its pid is its process group id
        try:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill_group(pgid)
                    proc.wait(timeout=10)
            # Python stubs normally exit with the server; anything left in its group goes now.
            self._kill_group(pgid)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._log_fh:
                self._log_fh.close()
                self._log_fh = None
        return proc.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        for pid in _group_members(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --------------------------------------------------------------------------------- reading
    def log_text(self) -> str:
        """This run's log (from its start in the file)."""
        if not self.log_file or not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as fh:
            fh.seek(getattr(self, "_log_offset", 0))
            return fh.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join("    | " + line for line in tail)

    def log_errors(self, limit: int = 6) -> list[str]:
        """Triton's error lines (E....), the escaped tracebacks in them expanded, harmless CPU noise left out."""
        errors: list[str] = []
        for line in self.log_text().splitlines():
            if not _ERROR_LINE.match(line) or any(noise in line for noise in _HARMLESS):
                continue
            text = line.replace("\\n", "\n")
            lines = text.splitlines()
            if len(lines) > 30:
                lines = lines[:30] + [f"... ({len(lines) - 30} more lines)"]
            text = "\n".join(lines)
            if text not in errors:
                errors.append(text)
        return errors[:limit]

    def failure_report(self, tail_lines: int = 15) -> str:
        """What went wrong, for a person: the error lines, then the log tail without the status tables."""
        parts = []
        errors = self.log_errors()
        if errors:
            parts.append("  errors in the log:")
            parts += ["    | " + line for e in errors for line in e.splitlines()]
        tail = [ln for ln in self.log_text().splitlines() if not ln.lstrip().startswith(("|", "+"))][-tail_lines:]
        parts.append("  log tail:")
        parts += ["    | " + ln for ln in tail]
        return "\n".join(parts)

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_metrics(self.metrics_text())

    def model_ready(self, model: str, version: str = "") -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        try:
            with urllib.request.urlopen(f"http://{self.http_address}{path}", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


# ------------------------------------------------------------------------------------------ metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")


def _parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """'{a="x",b="y\\"z"}' -> (("a","x"),("b",'y"z')), sorted by name."""
    body = text[1:-1]
    labels: dict[str, str] = {}
    i, n = 0, len(body)
    while i < n:
        while i < n and body[i] in " ,":
            i += 1
        if i >= n:
            break
        eq = body.index("=", i)
        name = body[i:eq].strip()
        if body[eq + 1] != '"':
            raise ValueError(f"bad label value in {text!r}")
        j = eq + 2
        value = []
        while body[j] != '"':
            if body[j] == "\\":
                j += 1
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(body[j], "\\" + body[j]))
            else:
                value.append(body[j])
            j += 1
        labels[name] = "".join(value)
        i = j + 1
    return tuple(sorted(labels.items()))


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition -> {(name, ((label, value), ...sorted)): value}.

    Histogram series appear under their own names (x_bucket with an "le" label, x_sum, x_count)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            continue
        out[(name, _parse_labels(labels) if labels else ())] = v
    return out


_MISSING = object()


def metric_value(metrics: Mapping, name: str, default=_MISSING, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (a subset match).

    Raises KeyError when no sample matches, unless a default is given."""
    want = {k: str(v) for k, v in labels.items()}
    total, found = 0.0, False
    for (n, lab), v in metrics.items():
        if n != name:
            continue
        d = dict(lab)
        if all(d.get(k) == val for k, val in want.items()):
            total += v
            found = True
    if not found:
        if default is _MISSING:
            raise KeyError(f"no metric {name}{want or ''}")
        return default
    return total


# ------------------------------------------------------------------------------- throwaway repositories
_IDENTITY_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "TEXT_IN" data_type: TYPE_STRING dims: [ -1 ] optional: true }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "ENV" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "TEXT_OUT" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "PYINFO" data_type: TYPE_STRING dims: [ 3 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

_IDENTITY_MODEL = '''\
import os
import ssl  # a stdlib C extension: fails when the stub's libpython and the stdlib are different builds
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Returns INPUT0 as OUTPUT0, TEXT_IN as TEXT_OUT, $HARNESS_ECHO_ENV as ENV, and
    PYINFO = [sys.version, sys.prefix, numpy.__file__] of the stub's interpreter."""

    def initialize(self, args):
        if os.environ.get("HARNESS_FAIL_INIT"):
            raise RuntimeError("initialize failed on purpose: " + os.environ["HARNESS_FAIL_INIT"])
        self.env = os.environ.get("HARNESS_ECHO_ENV", "")

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            t = pb_utils.get_input_tensor_by_name(request, "TEXT_IN")
            text = t.as_numpy() if t is not None else np.array([], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", x.astype(np.float32)),
                pb_utils.Tensor("ENV", np.array([self.env.encode()], dtype=np.object_)),
                pb_utils.Tensor("TEXT_OUT", text.astype(np.object_)),
                pb_utils.Tensor("PYINFO", np.array([sys.version.encode(), sys.prefix.encode(),
                                                    np.__file__.encode()], dtype=np.object_)),
            ]))
        return responses
'''

_FAKE_PIPELINE_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  { name: "IMAGE" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }
]
output [
  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "TOKEN_IDS" data_type: TYPE_INT64 dims: [ -1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

_FAKE_PIPELINE_MODEL = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stand-in for the mm_pipeline ensemble: same inputs/outputs, no model.

    TEXT = "images=<n> bytes=<sizes> prompt=<prompt> max_tokens=<m>", TOKEN_IDS = 0..m-1 (m defaults to 4).
    A prompt starting with "FAIL" returns an INVALID_ARG error (HTTP 400) carrying the prompt, one starting with
    "CRASH" an INTERNAL error (HTTP 500)."""

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0].decode()
            mt = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
            max_tokens = int(mt.as_numpy().reshape(-1)[0]) if mt is not None else None
            if prompt.startswith("FAIL"):
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("bad prompt: " + prompt, pb_utils.TritonError.INVALID_ARG)))
                continue
            if prompt.startswith("CRASH"):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("internal: " + prompt)))
                continue
            sizes = ",".join(str(len(b)) for b in images)
            text = f"images={len(images)} bytes={sizes} prompt={prompt} max_tokens={max_tokens}"
            ids = np.arange(max_tokens if max_tokens is not None else 4, dtype=np.int64)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("TEXT", np.array([text.encode()], dtype=np.object_)),
                pb_utils.Tensor("TOKEN_IDS", ids),
            ]))
        return responses
'''


def write_python_model(repo: str | os.PathLike, name: str, config: str, model_py: str) -> Path:
    """Write <repo>/<name>/config.pbtxt and <repo>/<name>/1/model.py; return the repository path."""
    repo = Path(repo)
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(model_py)
    return repo


def write_identity_repo(repo: str | os.PathLike, name: str = "identity") -> Path:
    """A Python-backend model: INPUT0 (FP32 [-1]) -> OUTPUT0, TEXT_IN (BYTES, optional) -> TEXT_OUT,
    ENV = $HARNESS_ECHO_ENV, PYINFO = the stub's [sys.version, sys.prefix, numpy file];
    $HARNESS_FAIL_INIT makes initialize() fail. It imports ssl, so a libpython/stdlib mismatch shows."""
    return write_python_model(repo, name, _IDENTITY_CONFIG.format(name=name), _IDENTITY_MODEL)


def write_fake_pipeline_repo(repo: str | os.PathLike, name: str = "mm_pipeline") -> Path:
    """A model with the mm_pipeline contract (IMAGE, PROMPT, MAX_TOKENS -> TEXT, TOKEN_IDS) and no ML:
    for testing clients and scripts without the real models."""
    return write_python_model(repo, name, _FAKE_PIPELINE_CONFIG.replace("{name}", name), _FAKE_PIPELINE_MODEL)
