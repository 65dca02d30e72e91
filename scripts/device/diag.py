"""Device diagnostics (cheap): the real cause of a failing model import, and the control plane's
latencies (ZeroMQ DEALER/ROUTER round trip between two processes over TCP loopback: blocking poll vs
spinning, and a fresh socket's connect + first round trip).   python scripts/device/diag.py"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import traceback


def _echo(addr_q, spin):
    import zmq

    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    addr_q.put(port)
    poller = zmq.Poller()
    poller.register(r, zmq.POLLIN)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if spin:
            if not r.poll(0):
                time.sleep(0)
                continue
        elif not dict(poller.poll(50)):
            continue
        frames = r.recv_multipart()
        if frames[1] == b"stop":
            break
        r.send_multipart(frames)


def rtt(spin_server: bool, spin_client: bool, n: int = 300) -> dict:
    import zmq

    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_echo, args=(q, spin_server), daemon=True)
    p.start()
    port = q.get(timeout=60)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.send(b"x" * 200)
        if spin_client:
            while not s.poll(0):
                time.sleep(0)
        else:
            s.poll(1000)
        s.recv()
        out.append(time.perf_counter() - t0)
    fresh = []
    for _ in range(30):
        t0 = time.perf_counter()
        f = ctx.socket(zmq.DEALER)
        f.setsockopt(zmq.LINGER, 0)
        f.connect(f"tcp://127.0.0.1:{port}")
        f.send(b"y")
        f.poll(1000)
        f.recv()
        fresh.append(time.perf_counter() - t0)
        f.close()
    s.send(b"stop")
    p.join(5)
    return {"rtt_us": statistics.median(out[50:]) * 1e6, "fresh_socket_first_rtt_us": statistics.median(fresh) * 1e6}


if __name__ == "__main__":
    for mod in ("transformers.models.qwen2_vl.modeling_qwen2_vl", "transformers.models.qwen2_vl"):
        try:
            __import__(mod)
            print("import ok:", mod)
        except Exception:
            print("import FAILED:", mod)
            traceback.print_exc(limit=30)
    try:
        from transformers import Qwen2VLForConditionalGeneration  # noqa: F401

        print("Qwen2VLForConditionalGeneration ok")
    except Exception as exc:
        print("Qwen2VLForConditionalGeneration FAILED:", repr(exc), "cause:", repr(exc.__cause__))
    for spin_server, spin_client in ((False, False), (True, False), (False, True), (True, True)):
        print(f"zmq spin server={spin_server} client={spin_client}:", rtt(spin_server, spin_client), flush=True)
