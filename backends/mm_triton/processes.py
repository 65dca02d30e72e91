"""Starting and stopping server processes as a group: a child in its own process group that dies with its
parent, and a SIGKILL for whatever is left in a group (tritonserver's Python-backend stubs)."""

from __future__ import annotations

import ctypes
import os
import signal

from .procfs import group_members

_PR_SET_PDEATHSIG = 1


def child_setup(parent_pid: int, die_with_parent: bool = True) -> None:
    """``preexec_fn`` of a server child (runs in the child before exec).

    Own process group: stopping the group reaches the Python stubs too, and Ctrl-C goes to the parent only.
    With ``die_with_parent`` the child gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG),
    even if the parent is SIGKILLed."""
    os.setsid()
    if die_with_parent:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except Exception:  # noqa: BLE001 - no prctl (not Linux): the atexit stop still applies
            pass
        if os.getppid() != parent_pid:  # the parent is already gone
            os._exit(1)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process still in group ``pgid``."""
    for pid in group_members(pgid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
