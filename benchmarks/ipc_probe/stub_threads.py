"""Per-thread wake-ups (context switches/s) and CPU of the Triton Python stubs of one server, over a window:
stub_threads.py SECONDS [TRITONSERVER_PID] (without the pid: every stub on the host)."""

from __future__ import annotations

import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def stubs(parent: int) -> dict[int, str]:
    """pid -> model name of every stub (children of ``parent`` when it is not 0)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd[0].endswith(b"triton_python_backend_stub") and (not parent or ppid == parent):
            out[int(pid)] = os.path.basename(os.path.dirname(os.path.dirname(cmd[1].decode())))
    return out


def sample(pid: int) -> dict[int, tuple[str, float, int]]:
    """tid -> (name, CPU seconds, context switches)."""
    res = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            status = open(f"/proc/{pid}/task/{tid}/status").read().splitlines()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
        res[int(tid)] = (
            stat[stat.index("(") + 1 : stat.rindex(")")],
            (int(fields[11]) + int(fields[12])) / HZ,
            switches,
        )
    return res


def main() -> None:
    window = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    found = stubs(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    before = {p: sample(p) for p in found}
    time.sleep(window)
    for pid, name in sorted(found.items(), key=lambda kv: kv[1]):
        rows = []
        for tid, (comm, cpu, sw) in sample(pid).items():
            cpu0, sw0 = before[pid].get(tid, (comm, 0.0, 0))[1:]
            rows.append((tid, comm, (sw - sw0) / window, (cpu - cpu0) / window * 100))
        busy = [f"{t}:{c} {w:.0f}/s {u:.0f}%" for t, c, w, u in sorted(rows, key=lambda r: -r[2]) if w >= 1 or u >= 1]
        print(f"{name} pid {pid}: {len(rows)} threads; busy: " + ", ".join(busy))


if __name__ == "__main__":
    main()
