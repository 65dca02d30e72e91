"""The one reader of Linux ``/proc`` process entries: stat fields, command lines, resident memory, and the
process-tree walks built on them (a process group, a parent's children, a whole subtree).

Every function tolerates a process that exits while it is being read: it is then simply absent (or None).
The launcher (stopping a server's group), the stub watchdog (a server's Python-backend stubs), the benchmark
samplers (memory of a server's tree) and the tests all use these instead of parsing /proc themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the project reads."""

    pid: int
    state: str  # R, S, D, Z (zombie), X (dead), ...
    ppid: int
    pgrp: int
    utime: int  # field 14, clock ticks of CPU time in user mode
    stime: int  # field 15, in kernel mode
    start_time: int  # field 22, clock ticks after boot: tells a reused pid from the original process

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """The stat entry of ``pid``, or None when there is no such process (or it is unreadable)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2 :].split()  # from 'state' on: comm may hold spaces and parens
    if len(fields) < 20:
        return None
    return ProcStat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[11]), int(fields[12]), int(fields[19]))


def all_processes() -> list[ProcStat]:
    """Every process readable now."""
    out = []
    for entry in os.listdir(PROC):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                out.append(stat)
    return out


def cmdline(pid: int) -> list[str] | None:
    """The argument vector of ``pid`` (empty for kernel threads and zombies), None when it is gone."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def group_members(pgid: int) -> list[int]:
    """Pids of the processes in process group ``pgid``."""
    return [p.pid for p in all_processes() if p.pgrp == pgid]


def children(ppid: int) -> list[ProcStat]:
    """The processes whose parent is ``ppid``."""
    return [p for p in all_processes() if p.ppid == ppid]


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (e.g. tritonserver and its Python-backend stubs)."""
    table = all_processes()
    by_parent: dict[int, list[int]] = {}
    for p in table:
        by_parent.setdefault(p.ppid, []).append(p.pid)
    present = {p.pid for p in table}
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in present:
            continue
        out.append(pid)
        todo.extend(by_parent.get(pid, []))
    return out


def _status_kib(pid: int, field: str, file: str = "status") -> int | None:
    try:
        for line in (PROC / str(pid) / file).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    """Resident set size in KiB (VmRSS), None when the process is gone; 0 for a process without memory."""
    if not (PROC / str(pid)).exists():
        return None
    return _status_kib(pid, "VmRSS:") or 0


def pss_kib(pid: int) -> int | None:
    """Proportional set size in KiB (shared pages split between their users), None when unreadable."""
    return _status_kib(pid, "Pss:", "smaps_rollup")
