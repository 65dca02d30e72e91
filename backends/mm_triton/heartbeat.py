"""A stub's heartbeat: since when it has been inside ``execute`` (0.0 when it is not), for the watchdog.

A stub that hangs without stopping (a deadlock, a native call that never returns: state R or S, not T) answers
nothing, and Triton waits for it forever. Every model's ``execute`` (``ModelBase`` wraps each subclass's) marks
its start and end in a small file, ``/dev/shm/mm_heartbeat_<stub pid>`` (8 bytes: CLOCK_MONOTONIC seconds, the
same clock in every process of the host), and so do each iteration of a language engine's loop and each
batch of the encoder's batcher (those models' ``execute`` only hands requests over: a hang there would be
outside any call). The file holds the oldest start
of the activities under way (``Activity``); the watchdog kills a stub busy in one of them longer than its
``hang_s`` and reloads it like a dead one. The file goes with the model's ``finalize``; one of a stub that was
killed is removed by the watchdog after the reload, when its server dies, or at the next watchdog start (``sweep``).

``MM_TEST_HANG_FILE`` (tests only): while that file exists and names the model (its text, split by whitespace),
that model's ``execute`` waits for it to go, i.e. hangs without being stopped; ``<model>/engine`` hangs that
model's engine loop instead, ``<instance>/batch`` (e.g. ``mm_encoder_0_0/batch``) an encoder's batcher.
"""

from __future__ import annotations

import atexit
import enum
import functools
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)
PREFIX = "mm_heartbeat_"
SHM_DIR = Path("/dev/shm")
_FORMAT = "<d"


def path_for(pid: int, shm_dir: Path | None = None) -> Path:
    return (shm_dir or SHM_DIR) / f"{PREFIX}{pid}"


def busy_since(pid: int, shm_dir: Path | None = None) -> float:
    """Since when (time.monotonic) stub ``pid`` has been inside one ``execute``; 0.0 if it is not, or has no file."""
    try:
        with open(path_for(pid, shm_dir), "rb") as f:
            data = f.read(8)
    except OSError:
        return 0.0
    return struct.unpack(_FORMAT, data)[0] if len(data) == 8 else 0.0


def remove(pid: int, shm_dir: Path | None = None) -> None:
    try:
        path_for(pid, shm_dir).unlink()
    except OSError:
        pass


def sweep(shm_dir: Path | None = None) -> int:
    """Remove the heartbeat files of processes that are gone (a stub Triton killed at shutdown runs no exit
    handler); returns how many. Files of live processes are left alone, whoever they belong to."""
    from . import procfs

    removed = 0
    for path in (shm_dir or SHM_DIR).glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX) :]
        if not pid.isdigit():
            continue
        stat = procfs.proc_stat(int(pid))
        if stat is None or not stat.alive:
            remove(int(pid), shm_dir)
            removed += 1
    return removed


class Activity(enum.Enum):
    """What a stub can be busy in; each is marked on its own, so overlapping ones never hide each other's start."""

    EXECUTE = "execute"  # a model's execute() (Triton calls one at a time per instance)
    ENGINE_LOOP = "engine_loop"  # one iteration of the language engine's loop (its own thread)
    ENCODE_BATCH = "encode_batch"  # one vision-tower batch of the encoder (its batcher thread)


class Heartbeat:
    """This process's heartbeat file; ``beat(busy, activity)`` is called around every ``execute`` (any thread),
    engine loop iteration and encoder batch."""

    def __init__(self, shm_dir: Path | None = None) -> None:
        self._fd: int | None = None
        # per activity: nested marks (a subclass calling super().execute marks once) and since when it is busy
        self._depth = dict.fromkeys(Activity, 0)
        self._since: dict[Activity, float] = {}
        self._lock = threading.Lock()
        try:
            self._fd = os.open(path_for(os.getpid(), shm_dir), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.pwrite(self._fd, struct.pack(_FORMAT, 0.0), 0)
            atexit.register(remove, os.getpid(), shm_dir)  # a stub that exits cleanly leaves no file
        except OSError as exc:  # no /dev/shm: the watchdog then sees no heartbeat, as before
            log.warning("heartbeat: cannot create %s: %s", path_for(os.getpid(), shm_dir), exc)

    def beat(self, busy: bool, activity: Activity = Activity.EXECUTE) -> None:
        with self._lock:
            depth = self._depth[activity] = self._depth[activity] + (1 if busy else -1)
            if depth != (1 if busy else 0):
                return
            if busy:
                self._since[activity] = time.monotonic()
            else:
                self._since.pop(activity, None)
            if self._fd is not None:
                os.pwrite(self._fd, struct.pack(_FORMAT, min(self._since.values(), default=0.0)), 0)


_beats: dict[int, Heartbeat] = {}  # by pid: a forked child makes its own
_beats_lock = threading.Lock()


def heartbeat() -> Heartbeat:
    """The process's one heartbeat, made on first use (in a stub: its first ``execute``)."""
    with _beats_lock:
        hb = _beats.get(os.getpid())
        if hb is None:
            hb = _beats[os.getpid()] = Heartbeat()
        return hb


def close() -> None:
    """This process's heartbeat file goes (a model's ``finalize``: the stub is about to exit)."""
    with _beats_lock:
        if _beats.pop(os.getpid(), None) is not None:
            remove(os.getpid())


def hang_for_tests(model: str) -> None:
    flag = os.environ.get("MM_TEST_HANG_FILE")
    if not flag:
        return
    try:
        names = Path(flag).read_text().split()
    except OSError:
        return
    if model in names:
        log.warning("%s: hanging while %s exists (MM_TEST_HANG_FILE)", model, flag)
        while os.path.exists(flag):
            time.sleep(0.05)


def marked(execute: Callable[..., Any]) -> Callable[..., Any]:
    """``execute`` with its start and end on the heartbeat."""

    @functools.wraps(execute)
    def run(self: Any, requests: Any) -> Any:
        hb = heartbeat()
        hb.beat(True)
        try:
            hang_for_tests(getattr(self, "model_name", ""))
            return execute(self, requests)
        finally:
            hb.beat(False)

    run.__mm_heartbeat__ = True  # type: ignore[attr-defined]
    return run
