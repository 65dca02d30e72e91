"""mm_triton.procfs, the one /proc reader, against real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mm_triton import procfs
from mm_triton.processes import child_setup, kill_group

BUSY = """\
import time
x = bytearray(40 * 2**20)
t = time.monotonic()
while time.monotonic() - t < 0.4:
    pass
time.sleep(30)
"""


def test_stat_cmdline_memory_and_tree_of_a_child():
    child = subprocess.Popen([sys.executable, "-c", BUSY, "marker-arg"])
    try:
        time.sleep(0.6)
        stat = procfs.proc_stat(child.pid)
        assert stat is not None and stat.alive and stat.ppid == os.getpid()
        assert stat.utime + stat.stime > 0  # it spun for 0.4 s
        assert procfs.cmdline(child.pid)[-1] == "marker-arg"
        assert procfs.rss_kib(child.pid) > 40 * 1024
        assert child.pid in [p.pid for p in procfs.children(os.getpid())]
        assert child.pid in procfs.descendants(os.getpid())
        assert os.getpid() not in procfs.descendants(child.pid)
    finally:
        child.kill()
        child.wait()
    assert procfs.proc_stat(child.pid) is None
    assert procfs.cmdline(child.pid) is None and procfs.rss_kib(child.pid) is None
    assert child.pid not in procfs.descendants(os.getpid())


def test_group_members_and_kill_group():
    parent = os.getpid()
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
            "time.sleep(30)",
        ],
        preexec_fn=lambda: child_setup(parent, True),
    )
    try:
        deadline = time.monotonic() + 10
        while len(procfs.group_members(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = procfs.group_members(leader.pid)
        assert leader.pid in members and len(members) == 2  # its own group: the leader and its child
        assert os.getpid() not in members
        kill_group(leader.pid)
        leader.wait(timeout=10)
        deadline = time.monotonic() + 10
        while procfs.group_members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procfs.group_members(leader.pid) == []
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
