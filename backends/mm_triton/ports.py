"""Free TCP ports for servers started on this machine."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
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


def distinct_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` different free ports."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(host)
        if p not in ports:
            ports.append(p)
    return ports


def free_run(n: int, host: str = "127.0.0.1", attempts: int = 200) -> int:
    """The first of ``n`` consecutive free ports (for servers configured by one port base)."""
    for _ in range(attempts):
        base = free_port(host)
        if base + n <= 65535 and all(port_is_free(base + i, host) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")
