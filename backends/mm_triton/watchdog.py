"""Stub watchdog: reload a model whose Python-backend stub process died or stays stopped.

Seen with tritonserver 2.51 (the version this project ships): when a model instance's stub process dies
(SIGKILL, OOM killer, a segfault in a native library), Triton does **not** restart it. The model keeps
reporting READY (``/v2/models/<m>/ready`` answers 200) while every request to it fails at once with
``Stub process '<instance>' is not healthy.``, forever; and a stub that is stopped (SIGSTOP, a long stall) for
long enough makes tritonserver itself die of a ``boost::interprocess::lock_exception``. Unloading and loading
the model again starts new stubs. That needs ``--model-control-mode=explicit`` (``server_args`` gives it, with
the models to load and Triton's repository and shared-memory APIs closed to clients).

The watchdog polls the server's child processes (Linux ``/proc``): each stub's command line names its
model file (``<repo>/<model>/<version>/model.py``), its ``/dev/shm`` region and its instance. When a stub it has
seen disappears while the server runs, it asks the internal ``mm_control`` model to reload that model (with the
per-server internal token read from its 0600 file: nothing secret on a command line or in an environment), then
removes the dead stub's ``/dev/shm`` region, which Triton leaves behind. A stub stopped longer than
``stop_grace_s`` (``MM_STUB_STOP_GRACE_S``, 2 s) is killed first, so that it is restarted before Triton's IPC
lock gives up. A stub that hangs without stopping (busy in one ``execute`` longer than ``hang_s``,
``MM_STUB_HANG_S``, 120 s, from its heartbeat: ``mm_triton.heartbeat``) is killed and reloaded the same way. The
public pipelines are BLS models and stay loaded meanwhile: their requests get UNAVAILABLE
(model_reloading) for the few seconds this takes. Every restart is logged and recorded in ``restarts``.

    server = TritonServer(repo, args=server_args()).start()
    with StubWatchdog(server.pid, server.http_address):
        ...

or as a program next to a running server: ``python -m mm_triton.watchdog --pid PID --http HOST:PORT``.
A legacy ``token`` (``server_args(token)``, ``MM_WATCHDOG_TOKEN``) reloads through the repository API instead;
its value is then on the server's command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import heartbeat, procfs

log = logging.getLogger(__name__)
HEADER = "x-mm-watchdog"
CONTROL_MODEL = "mm_control"
STUB_NAME = "triton_python_backend_stub"
SHM_PREFIX_RE = re.compile(r"triton_python_backend_shm_region_[0-9A-Za-z_-]{1,64}")
DEFAULT_STOP_GRACE_S = 2.0
DEFAULT_HANG_S = 120.0  # longer than any one execute() of a healthy model (they hand work to threads)


BASELINE_MODELS = ("mm_monolithic", "mm_monolithic_stream")


def load_list(repositories, with_baseline: bool = False) -> list[str]:
    """The models of ``repositories`` to load at start: all but the monolithic baseline (unless asked for)."""
    names = []
    for repo in repositories:
        for entry in sorted(Path(repo).iterdir()):
            if (entry / "config.pbtxt").is_file() and (with_baseline or entry.name not in BASELINE_MODELS):
                names.append(entry.name)
    return names


CLOSED_HEADER = "x-mm-closed"


def server_args(token: str | None = None, models: list[str] | None = None) -> list[str]:
    """tritonserver options the watchdog needs: explicit model control (``models`` loaded at start, default
    all), and Triton's repository and shared-memory APIs closed to clients.

    Closed means restricted to a header value that contains a newline, which no HTTP or gRPC client can send:
    the value may be read on the command line by anyone, it opens nothing. The watchdog reloads through the
    internal ``mm_control`` model instead (its token is in a 0600 file, never on a command line). ``token``
    (legacy): restrict the repository API to ``HEADER: token`` instead, for a watchdog that uses it; that value
    is on the server's command line, visible to every local user."""
    closed = f"{CLOSED_HEADER}={secrets.token_hex(16)}\n"
    loads = ["--load-model=*"] if models is None else [f"--load-model={m}" for m in models]
    if token is None:
        restricted = [
            f"--http-restricted-api=model-repository,shared-memory:{closed}",
            f"--grpc-restricted-protocol=model-repository,shared-memory:{closed}",
        ]
    else:
        if any(c in token for c in " ,:=") or len(token) < 16:
            raise ValueError("watchdog token: at least 16 characters, no spaces, commas, colons or '='")
        restricted = [
            f"--http-restricted-api=model-repository:{HEADER}={token}",
            f"--grpc-restricted-protocol=model-repository:{HEADER}={token}",
            f"--http-restricted-api=shared-memory:{closed}",
            f"--grpc-restricted-protocol=shared-memory:{closed}",
        ]
    return ["--model-control-mode=explicit", *loads, *restricted]


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str
    start_time: int  # procfs.ProcStat.start_time: tells a reused pid from the original process
    shm_region: str = ""  # its /dev/shm region (argv[2]); Triton leaves it behind when the stub dies


@dataclass(frozen=True)
class Restart:
    model: str
    instance: str  # the instance whose stub died
    died_at: float  # time.time()
    seconds: float  # unload + load
    ok: bool
    error: str = ""


def list_stubs(server_pid: int) -> dict[int, Stub]:
    """The Python-backend stub processes whose parent is ``server_pid``, by pid."""
    out: dict[int, Stub] = {}
    for child in procfs.children(server_pid):
        argv = procfs.cmdline(child.pid)
        if not argv or len(argv) < 9 or not argv[0].endswith(STUB_NAME):
            continue
        model = Path(argv[1]).parent.parent.name  # <repo>/<model>/<version>/model.py
        region = argv[2]
        out[child.pid] = Stub(
            child.pid, model, argv[8], child.start_time, region if SHM_PREFIX_RE.fullmatch(region) else ""
        )
    return out


def stopped(stub: Stub) -> bool:
    """True while the stub is stopped (SIGSTOP, a debugger): state T or t in /proc/<pid>/stat."""
    stat = procfs.proc_stat(stub.pid)
    return stat is not None and stat.state in ("T", "t") and stat.start_time == stub.start_time


def remove_region(region: str, shm_dir: Path = Path("/dev/shm")) -> int:
    """Unlink a dead stub's shared-memory region; returns the bytes freed (0 if it was gone already)."""
    if not region:
        return 0
    path = shm_dir / region
    try:
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return 0
    return size


def _kill(stub: Stub, why: str) -> None:
    log.warning("watchdog: stub of %s (%s) %s: killing it to restart it", stub.instance, stub.model, why)
    try:
        os.kill(stub.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def alive(stub: Stub) -> bool:
    stat = procfs.proc_stat(stub.pid)
    return stat is not None and stat.alive and stat.start_time == stub.start_time


class StubWatchdog:
    """Polls the stubs of one tritonserver process; reloads a model when one of its stubs died."""

    def __init__(
        self,
        server_pid: int,
        http_address: str,
        token: str | None = None,
        interval_s: float = 0.5,
        load_timeout_s: float = 300.0,
        stop_grace_s: float | None = None,
        hang_s: float | None = None,
    ) -> None:
        if stop_grace_s is None:
            stop_grace_s = float(os.environ.get("MM_STUB_STOP_GRACE_S") or DEFAULT_STOP_GRACE_S)
        if hang_s is None:
            hang_s = float(os.environ.get("MM_STUB_HANG_S") or DEFAULT_HANG_S)
        self.stop_grace_s = stop_grace_s  # a stub stopped this long is killed and restarted
        self.hang_s = hang_s  # a stub busy in one execute() this long is killed and restarted (0: never)
        self._stopped_since: dict[int, float] = {}
        self.shm_freed_bytes = 0  # /dev/shm regions of dead stubs removed
        self.server_pid = server_pid
        self.http_address = http_address
        self.token = token
        self.interval_s = interval_s
        self.load_timeout_s = load_timeout_s
        self.restarts: list[Restart] = []
        self._known: dict[int, Stub] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> StubWatchdog:
        heartbeat.sweep()  # files left by the stubs of servers that are gone
        self._known = list_stubs(self.server_pid)
        if not self._known:
            log.warning("watchdog: tritonserver %d has no Python-backend stubs (yet)", self.server_pid)
        self._thread = threading.Thread(target=self._run, name="mm-stub-watchdog", daemon=True)
        self._thread.start()
        log.info("watchdog: watching %d stub(s) of tritonserver %d", len(self._known), self.server_pid)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.load_timeout_s + 5)

    def __enter__(self) -> StubWatchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def busy(self) -> bool:
        """True while a reload is in progress."""
        return self._lock.locked()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stub is dead, stopped or being restarted; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.busy and all(alive(s) and not stopped(s) for s in list(self._known.values())):
                return True
            time.sleep(0.1)
        return False

    # ---- the loop ----------------------------------------------------------------------------------
    def _server_alive(self) -> bool:
        stat = procfs.proc_stat(self.server_pid)
        return stat is not None and stat.alive

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._server_alive():
                # a dead server unlinks nothing: its stubs' /dev/shm regions would stay until reboot
                freed = sum(remove_region(stub.shm_region) for stub in self._known.values() if not alive(stub))
                self.shm_freed_bytes += freed
                heartbeat.sweep()
                log.info(
                    "watchdog: tritonserver %d is gone (%d bytes of /dev/shm removed); stopping", self.server_pid, freed
                )
                return
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                log.exception("watchdog: check failed")

    def check_once(self) -> list[Restart]:
        """Reload the models of stubs that died since the last look; returns the restarts done."""
        with self._lock:
            self._kill_stopped()
            self._kill_hung()
            current = list_stubs(self.server_pid)
            dead = [s for s in self._known.values() if s.pid not in current or not alive(s)]
            # stubs that appeared (a model loaded later, or reloaded by someone else) are watched from now on
            self._known = {**{p: s for p, s in self._known.items() if s not in dead}, **current}
            done: list[Restart] = []
            for model in sorted({s.model for s in dead}):
                instance = next(s.instance for s in dead if s.model == model)
                if self._stop.is_set() or not self._server_alive():
                    break
                done.append(self._reload(model, instance))
            if dead:
                self._known = list_stubs(self.server_pid)
                in_use = {s.shm_region for s in self._known.values()}
                for stub in dead:  # after the reload: Triton no longer maps the dead stub's region
                    heartbeat.remove(stub.pid)
                    if stub.shm_region not in in_use and all(r.ok for r in done if r.model == stub.model):
                        self.shm_freed_bytes += remove_region(stub.shm_region)
            self.restarts.extend(done)
            return done

    def _kill_stopped(self) -> None:
        """SIGKILL a stub that stays stopped (SIGSTOP, a swap or throttling stall looks the same to Triton)
        longer than ``stop_grace_s``: Triton 2.51 waits on its IPC lock and, past its own timeout, dies of a
        ``boost::interprocess::lock_exception``; a killed stub is reloaded like any dead one."""
        now = time.monotonic()
        for pid, stub in list(self._known.items()):
            if not stopped(stub):
                self._stopped_since.pop(pid, None)
                continue
            since = self._stopped_since.setdefault(pid, now)
            if now - since >= self.stop_grace_s:
                _kill(stub, f"stopped for {now - since:.1f}s")
                self._stopped_since.pop(pid, None)

    def _kill_hung(self) -> None:
        """SIGKILL a stub that has been inside one ``execute`` for longer than ``hang_s`` (a deadlock, a call
        that never returns: it is not stopped, Triton just waits); it is reloaded like any dead one. mm_control
        is left alone: it cannot reload itself, and its reloads are long calls."""
        if self.hang_s <= 0:
            return
        now = time.monotonic()
        for pid, stub in list(self._known.items()):
            since = heartbeat.busy_since(pid)
            if not since or now - since < self.hang_s or stub.model == CONTROL_MODEL or not alive(stub):
                continue
            _kill(stub, f"inside one execute() for {now - since:.1f}s (hang_s {self.hang_s:g})")

    def _reload(self, model: str, instance: str) -> Restart:
        died_at, start = time.time(), time.monotonic()
        log.warning("watchdog: stub of %s (%s) died; Triton does not restart it: reloading %s", instance, model, model)
        try:
            if self.token is None:
                self._control_reload(model)
            else:
                self._repository_call(model, "unload")
                deadline = time.monotonic() + self.load_timeout_s
                while self._model_ready(model) and time.monotonic() < deadline:
                    time.sleep(0.05)
                self._repository_call(model, "load")
        except Exception as exc:  # noqa: BLE001 - recorded; retried when the next check finds it dead
            log.error("watchdog: reloading %s failed: %s", model, exc)
            return Restart(model, instance, died_at, time.monotonic() - start, False, str(exc)[:300])
        seconds = time.monotonic() - start
        log.warning("watchdog: %s reloaded in %.1fs", model, seconds)
        return Restart(model, instance, died_at, seconds, True)

    def _control_token(self) -> str:
        from .access import token_of_server

        return token_of_server(self.server_pid)

    def _control_reload(self, model: str) -> None:
        if model == CONTROL_MODEL:
            raise RuntimeError(f"{CONTROL_MODEL} cannot reload itself: restart the server (scripts/serve does)")
        body = json.dumps(
            {
                "inputs": [
                    {"name": name, "shape": [1], "datatype": "BYTES", "data": [value]}
                    for name, value in (
                        ("ACTION", "reload"),
                        ("MODEL", model),
                        ("MM_INTERNAL_TOKEN", self._control_token()),
                    )
                ]
            }
        ).encode()
        url = f"http://{self.http_address}/v2/models/{CONTROL_MODEL}/infer"
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.load_timeout_s) as r:
                r.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(
                f"reload {model}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
            ) from None

    def _repository_call(self, model: str, op: str) -> None:
        url = f"http://{self.http_address}/v2/repository/models/{model}/{op}"
        req = urllib.request.Request(
            url, data=b"{}", method="POST", headers={HEADER: self.token, "Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.load_timeout_s) as r:
                r.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:300]
            raise RuntimeError(f"{op} {model}: HTTP {exc.code}: {body}") from None

    def _model_ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_address}/v2/models/{model}/ready", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm_triton.watchdog", description=__doc__.split("\n\n")[0])
    p.add_argument("--pid", type=int, required=True, help="the tritonserver process id")
    p.add_argument("--http", required=True, metavar="HOST:PORT", help="the server's HTTP address")
    p.add_argument("--interval", type=float, default=0.5, metavar="SECONDS")
    args = p.parse_args(argv)
    token = os.environ.get("MM_WATCHDOG_TOKEN") or None  # legacy: reload through the repository API
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    dog = StubWatchdog(args.pid, args.http, token, args.interval).start()
    try:
        while dog._thread is not None and dog._thread.is_alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    dog.stop()
    print(json.dumps([r.__dict__ for r in dog.restarts]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
