#!/usr/bin/env python3
"""GPU transfer benchmark: time from a pull being issued to the embedding being usable on the receiver GPU.

For embeddings of 256 ... 32768 tokens x hidden 3584 and 8192 (bf16), all in one run:
  (a) this project's path, default 1024-token window + continuations      (sender GPU 0 -> receiver GPU 1, NCCL)
  (b) the same with an exact-size window (one chunk)                        (GPU 0 -> GPU 1, NCCL)
  (c) raw NCCL send/recv of the same bytes on the same GPU pair             (recv posted -> bytes landed)
  (d) Triton's own way: BLS call to a model returning the embedding as a GPU output tensor, made usable on
      GPU 1 by the calling model                                            (tritonserver 2.51, Python backend)
  and the same-GPU path: (a)/(b) over CUDA IPC with both pools on GPU 0, against a raw device-to-device copy.

Prints a table and writes bench_transfer.json + bench_transfer.png into --out. Each number is the median of
--iters timed runs after --warmup runs; every pulled embedding is checked against the sender's checksum.

    python scripts/bench_transfer.py --out results/transfer           # everything (2 GPUs)
    python scripts/bench_transfer.py --quick --skip-triton            # a smoke run
    python scripts/bench_transfer.py --mode one-gpu --out results/t1  # one GPU: CUDA IPC vs a raw D2D copy
    python scripts/bench_transfer.py --mode cpu --out results/tcpu    # no GPU: shm and host vs memcpy + RTT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue as queue_mod
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "backends", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(var, value)

TOKENS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
HIDDENS = [3584, 8192]
BLOCK = 128
WINDOW = 1024
MAX_TOKENS = 32768


# =============================================================================== worker processes
def _config(**kw):
    from mmtransfer import TransferConfig

    base = dict(
        block_tokens=BLOCK,
        default_window_tokens=WINDOW,
        pool_blocks=MAX_TOKENS // BLOCK + 16,
        max_embed_tokens=MAX_TOKENS,
        pull_timeout_s=60,
        bootstrap_timeout_s=120,
        ttl_s=600,
    )
    base.update(kw)
    return TransferConfig(**base)


def _checksum(t) -> int:
    import torch

    return int(t.reshape(-1).view(torch.int16).sum(dtype=torch.int64).item())


def worker_main(role: str, device: str, commands, replies) -> None:
    """role "sender": a SenderEndpoint per hidden size; role "receiver": Receivers per (hidden, window mode).
    Both also run the raw references: NCCL send/recv on a communicator of their own, D2D copy. Commands are
    tuples (op, *args) answered with ("ok", value) or ("error", text); ("stop",) ends the loop."""
    import torch

    torch.cuda.set_device(torch.device(device))
    ops = WorkerOps(role, device)
    replies.put(("ready", device))
    while True:
        try:
            cmd = commands.get(timeout=900)
        except queue_mod.Empty:
            break
        op, args = cmd[0], cmd[1:]
        if op == "stop":
            break
        handler = getattr(ops, f"op_{op}", None)
        try:
            if handler is None:
                replies.put(("error", f"unknown op {op}"))
            else:
                replies.put(("ok", handler(*args)))
        except Exception as exc:
            import traceback

            replies.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"))
    ops.close()
    replies.put(("stopped", None))


class WorkerOps:
    """What a worker process holds (endpoints, the raw NCCL communicator, buffers) and the ops on it."""

    def __init__(self, role: str, device: str) -> None:
        import torch

        self.role, self.device = role, device
        self.senders, self.receivers, self.raw = {}, {}, {}
        self.lib = None
        self.stream = torch.cuda.Stream(device)

    def close(self) -> None:
        for s in self.senders.values():
            s.close()
        for r in self.receivers.values():
            r.close()

    # ---- the project's transfers
    def op_sender(self, hidden: int, transport: str):  # -> address
        import torch

        from mmtransfer import BlockPool, SenderEndpoint

        pool = BlockPool(MAX_TOKENS // BLOCK + 16, BLOCK, hidden, torch.bfloat16, self.device, name=f"s{hidden}")
        self.senders[hidden] = SenderEndpoint(pool, _config(transport=transport), name=f"s{hidden}")
        return self.senders[hidden].address

    def op_register(self, hidden: int, tokens: int):  # -> (ref json, checksum)
        import torch

        data = torch.randn(tokens, hidden, device=self.device, dtype=torch.float32).to(torch.bfloat16)
        ref = self.senders[hidden].register(data)
        return ref.to_json(), _checksum(data)

    def op_receiver(self, hidden: int, mode: str, window: int, landing: str, transport: str) -> None:
        import torch

        from mmtransfer import BlockPool, Receiver

        pool = BlockPool(MAX_TOKENS // BLOCK + 16, BLOCK, hidden, torch.bfloat16, self.device, name=f"r{hidden}{mode}")
        cfg = _config(default_window_tokens=window, gpu_landing=landing, transport=transport, use_size_hint=True)
        self.receivers[(hidden, mode)] = Receiver(pool, cfg, name=f"r{hidden}{mode}")

    def op_pull(self, hidden: int, mode: str, ref_json: str, checksum: int) -> dict:
        from mmtransfer import EmbedRef

        got = self.receivers[(hidden, mode)].pull(EmbedRef.from_json(ref_json))
        ok = _checksum(got.embedding) == checksum
        r = got.record
        return {
            "ready_s": r.ready_s,
            "latency_s": r.latency_s,
            "chunks": r.chunks,
            "transport": r.transport,
            "ok": ok,
            "timings": got.timings or {},
        }

    # ---- raw NCCL and copy references
    def op_nccl_uid(self) -> str:
        from mmtransfer import nccl_lib

        self.lib = nccl_lib.load()
        uid = self.lib.get_unique_id()
        self.raw["uid"] = uid
        return nccl_lib.unique_id_to_hex(uid)

    def op_nccl_init(self, rank: int, uid_hex: str) -> str:
        import torch

        from mmtransfer import nccl_lib

        lib = self.lib = nccl_lib.load()
        uid = self.raw.get("uid") or nccl_lib.unique_id_from_hex(uid_hex)
        self.raw["comm"] = lib.comm_init_rank(2, uid, rank)
        self.raw["rank"] = rank
        buf = torch.zeros(16, dtype=torch.uint8, device=self.device)  # warm the pair up
        (lib.send if rank == 0 else lib.recv)(buf.data_ptr(), 16, 1 - rank, self.raw["comm"], self.stream.cuda_stream)
        self.stream.synchronize()
        return lib.version_string()

    def op_raw_buf(self, nbytes: int) -> None:  # one buffer reused by raw sends/recvs/copies
        import torch

        self.raw["buf"] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.raw["buf2"] = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if self.role == "copy" else None

    def op_raw_send(self, nbytes: int) -> None:  # post, answer at once (the kernel waits for the receive)
        import torch

        self.lib.send(self.raw["buf"].data_ptr(), nbytes, 1, self.raw["comm"], self.stream.cuda_stream)
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self.raw["send_event"] = ev

    def op_raw_wait(self):
        from mmtransfer.transports.streams import wait_event

        return wait_event(self.raw["send_event"], 60)

    def op_raw_recv(self, nbytes: int) -> dict:  # time from posting the receive to the bytes having landed
        def recv() -> None:
            self.lib.recv(self.raw["buf"].data_ptr(), nbytes, 0, self.raw["comm"], self.stream.cuda_stream)

        return self._timed(recv)

    def op_raw_copy(self, nbytes: int) -> dict:  # same-GPU reference: one device-to-device copy of nbytes
        import torch

        raw = self.raw
        src = raw.setdefault("csrc", torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        dst = raw.setdefault("cdst", torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        if src.numel() < nbytes:
            src = raw["csrc"] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dst = raw["cdst"] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._timed(lambda: dst[:nbytes].copy_(src[:nbytes], non_blocking=True))

    def _timed(self, work) -> dict:
        """Host and GPU time of ``work`` enqueued on this worker's stream, waited for."""
        import torch

        from mmtransfer.transports.streams import wait_event

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            work()
            end.record(self.stream)
        wait_event(end, 60)
        t1 = time.perf_counter()
        return {"host_s": t1 - t0, "gpu_s": start.elapsed_time(end) / 1e3}

    def op_free_raw(self) -> None:
        import torch

        for k in ("buf", "buf2", "csrc", "cdst"):
            self.raw.pop(k, None)
        torch.cuda.empty_cache()


class Worker:
    def __init__(self, role: str, device: str):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=worker_main, args=(role, device, self.commands, self.replies), daemon=True)
        self.proc.start()
        kind, _ = self.replies.get(timeout=180)
        assert kind == "ready"
        self.device = device

    def post(self, *cmd):
        self.commands.put(cmd)

    def result(self, timeout: float = 300):
        kind, value = self.replies.get(timeout=timeout)
        if kind == "error":
            raise RuntimeError(f"{self.device}: {value}")
        return value

    def call(self, *cmd, timeout: float = 300):
        self.post(*cmd)
        return self.result(timeout)

    def stop(self):
        try:
            self.commands.put(("stop",))
            self.replies.get(timeout=30)
        except Exception:
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


# =============================================================================== measurements
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def measure_project(
    sender: Worker, receiver: Worker, hidden: int, tokens: int, mode: str, iters: int, warmup: int
) -> dict:
    times, lat, chunks, ok, transport, phases = [], [], 0, True, "", {}
    for i in range(warmup + iters):
        ref, checksum = sender.call("register", hidden, tokens)
        rec = receiver.call("pull", hidden, mode, ref, checksum)
        ok = ok and rec["ok"]
        chunks, transport = rec["chunks"], rec["transport"]
        if i >= warmup:
            times.append(rec["ready_s"])
            lat.append(rec["latency_s"])
            for k, v in rec["timings"].items():
                phases.setdefault(k, []).append(v)
    return {
        "s": _median(times),
        "min_s": min(times),
        "with_done_s": _median(lat),
        "chunks": chunks,
        "ok": ok,
        "transport": transport,
        "phases_us": {k: _median(v) for k, v in phases.items()},
    }


def measure_raw_nccl(sender: Worker, receiver: Worker, nbytes: int, iters: int, warmup: int) -> dict:
    sender.call("raw_buf", nbytes)
    receiver.call("raw_buf", nbytes)
    host, gpu = [], []
    for i in range(warmup + iters):
        sender.call("raw_send", nbytes)
        rec = receiver.call("raw_recv", nbytes)
        sender.call("raw_wait")
        if i >= warmup:
            host.append(rec["host_s"])
            gpu.append(rec["gpu_s"])
    sender.call("free_raw")
    receiver.call("free_raw")
    return {"s": _median(host), "gpu_s": _median(gpu)}


def measure_copy(worker: Worker, nbytes: int, iters: int, warmup: int) -> dict:
    host, gpu = [], []
    for i in range(warmup + iters):
        rec = worker.call("raw_copy", nbytes)
        if i >= warmup:
            host.append(rec["host_s"])
            gpu.append(rec["gpu_s"])
    return {"s": _median(host), "gpu_s": _median(gpu)}


# ---- (d) Triton's own way ---------------------------------------------------------------------------
#: bench_producer (the encoder's stand-in) and bench_consumer (the language model's, BLS-calling it): a real
#: model repository, served as it is.
TRITON_REPOSITORY = ROOT / "benchmarks" / "models" / "transfer"


def measure_triton(configs, iters: int, warmup: int, out_dir: Path) -> dict:
    from mm_bench.kserve_http import infer  # no tritonclient needed
    from mm_triton.launcher import TritonServer

    results = {}
    repo = TRITON_REPOSITORY
    pool = 2 * 1024**3
    args = [f"--cuda-memory-pool-byte-size=0:{pool}", f"--cuda-memory-pool-byte-size=1:{pool}"]
    env = {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}
    with TritonServer(
        repo, env=env, args=args, log_file=out_dir / "bench_triton_server.log", startup_timeout_s=300
    ) as server:
        for hidden, tokens in configs:
            r = infer(
                server.http_address,
                "bench_consumer",
                {},
                {"TOKENS": [tokens], "HIDDEN": [hidden], "ITERS": [warmup + iters]},
                outputs=["TIMES", "WHERE"],
            )
            times = [float(x) for x in r["TIMES"]][warmup:]
            results[(hidden, tokens)] = {"s": _median(times), "min_s": min(times), "where": r["WHERE"][0]}
            print(
                f"  (d) triton BLS  hidden {hidden:5d} tokens {tokens:6d}: {_median(times) * 1e3:8.3f} ms "
                f"[{r['WHERE'][0]}]",
                flush=True,
            )
    return results


# =============================================================================== run, report
def machine() -> dict:
    import torch

    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        from mmtransfer import nccl_lib

        info["nccl"] = nccl_lib.load().version_string()
        info["nccl_library"] = nccl_lib.load().path
    except Exception as exc:
        info["nccl"] = f"unavailable: {exc}"
    try:
        info["nvidia_smi"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()
        )
        info["topology"] = (
            subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
            .stdout.strip()
            .splitlines()[:4]
        )
    except Exception:
        pass
    return info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "transfer")
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=TOKENS)
    ap.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=HIDDENS)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 sizes, 5 iterations")
    ap.add_argument("--skip-triton", action="store_true", help="leave (d) out")
    ap.add_argument("--skip-same-gpu", action="store_true")
    ap.add_argument(
        "--mode",
        default="two-gpu",
        choices=["two-gpu", "one-gpu", "cpu"],
        help="two-gpu: everything below; one-gpu: same-GPU CUDA IPC pull vs a raw device-to-device copy, 1-256 MiB "
        "(bench_transfer_one_gpu.json/.png); cpu: the shm and host transports, 256/1024/4096 x 3584 fp16 in "
        "one chunk (--tokens to change), vs a raw memcpy + one ZeroMQ round trip (bench_transfer_cpu.json)",
    )
    ap.add_argument(
        "--landing",
        default="direct",
        choices=["direct", "window"],
        help="gpu_landing of (a)/(b); the other one is measured too as (a-alt)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.iters, args.warmup = [256, 4096, 32768], 5, 2
    return args


def measure_size(args, s0, r1, r0, hidden: int, tokens: int, other: str) -> dict:
    """Every measurement of one (hidden, tokens) size: (a), (b), (a-alt), (c) and the same-GPU ones."""
    nbytes = tokens * hidden * 2
    row = {"hidden": hidden, "tokens": tokens, "bytes": nbytes}
    row["a"] = measure_project(s0, r1, hidden, tokens, "a", args.iters, args.warmup)
    row["b"] = measure_project(s0, r1, hidden, tokens, "b", args.iters, args.warmup)
    row["a_alt"] = measure_project(s0, r1, hidden, tokens, "a_alt", args.iters, args.warmup)
    row["a_alt"]["landing"] = other
    row["c"] = measure_raw_nccl(s0, r1, nbytes, args.iters, args.warmup)
    if r0:
        row["ipc_a"] = measure_project(s0, r0, hidden, tokens, "ipc_a", args.iters, args.warmup)
        row["ipc_b"] = measure_project(s0, r0, hidden, tokens, "ipc_b", args.iters, args.warmup)
        row["copy"] = measure_copy(r0, nbytes, args.iters, args.warmup)
    print(
        f"hidden {hidden:5d} tokens {tokens:6d} {nbytes / 2**20:8.1f} MiB: "
        f"a {row['a']['s'] * 1e3:7.3f} ms ({row['a']['chunks']} ch, {row['a']['transport']}) "
        f"b {row['b']['s'] * 1e3:7.3f} c {row['c']['s'] * 1e3:7.3f} (gpu {row['c']['gpu_s'] * 1e3:.3f})"
        + (
            f" | same-GPU a {row['ipc_a']['s'] * 1e3:7.3f} b {row['ipc_b']['s'] * 1e3:7.3f} "
            f"copy {row['copy']['gpu_s'] * 1e3:.3f} [{row['ipc_b']['transport']}]"
            if r0
            else ""
        )
        + ("" if all(row[k]["ok"] for k in ("a", "b", "a_alt")) else "  CHECKSUM MISMATCH"),
        flush=True,
    )
    return row


def sweep(args, info: dict) -> list[dict]:
    """Workers on cuda:0 (sender, same-GPU receiver) and cuda:1 (receiver); every size; a partial JSON after each."""
    other = "window" if args.landing == "direct" else "direct"
    rows = []
    s0, r1 = Worker("sender", "cuda:0"), Worker("receiver", "cuda:1")
    r0 = None if args.skip_same_gpu else Worker("receiver", "cuda:0")
    try:
        uid = s0.call("nccl_uid")
        s0.post("nccl_init", 0, uid)
        r1.post("nccl_init", 1, uid)
        info["nccl_raw"] = s0.result(300)
        r1.result(300)
        for hidden in args.hidden:
            s0.call("sender", hidden, "auto")
            r1.call("receiver", hidden, "a", WINDOW, args.landing, "auto")
            r1.call("receiver", hidden, "b", MAX_TOKENS, args.landing, "auto")
            r1.call("receiver", hidden, "a_alt", WINDOW, other, "auto")
            if r0:
                r0.call("receiver", hidden, "ipc_a", WINDOW, "direct", "auto")
                r0.call("receiver", hidden, "ipc_b", MAX_TOKENS, "direct", "auto")
            for tokens in args.tokens:
                rows.append(measure_size(args, s0, r1, r0, hidden, tokens, other))
                (args.out / "bench_transfer.json").write_text(
                    json.dumps({"machine": info, "rows": rows, "partial": True}, indent=1)
                )
    finally:
        for w in (s0, r1, r0):
            if w:
                w.stop()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode != "two-gpu":
        import bench_transfer_single as single

        run = single.run_cpu if args.mode == "cpu" else single.run_one_gpu
        return run(args, sys.modules[__name__])

    import torch

    if torch.cuda.device_count() < 2:
        print("bench_transfer: needs 2 GPUs", file=sys.stderr)
        return 2
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    rows = sweep(args, info)
    if not args.skip_triton:
        try:
            d = measure_triton([(r["hidden"], r["tokens"]) for r in rows], args.iters, args.warmup, args.out)
            for r in rows:
                r["d"] = d.get((r["hidden"], r["tokens"]))
        except Exception as exc:
            print(f"(d) failed: {type(exc).__name__}: {exc}", flush=True)
            info["triton_error"] = f"{type(exc).__name__}: {exc}"[:3000]
    summary = report(rows, info, args)
    (args.out / "bench_transfer.json").write_text(
        json.dumps(
            {
                "machine": info,
                "rows": rows,
                "summary": summary,
                "iters": args.iters,
                "warmup": args.warmup,
                "landing": args.landing,
            },
            indent=1,
        )
    )
    try:
        plot(rows, args.out / "bench_transfer.png", info)
    except Exception as exc:
        print(f"plot failed: {exc}")
    return 0 if all(r["a"]["ok"] and r["b"]["ok"] for r in rows) else 1


def _gbps(nbytes, s):
    return nbytes / s / 1e9 if s and s == s and s > 0 else float("nan")


def report(rows, info, args) -> dict:
    """The table; returns the numbers the targets are judged by."""
    print()
    print(f"machine: {', '.join(info.get('gpus', []))}; NCCL {info.get('nccl')}; torch {info.get('torch')}")
    head = (
        f"{'hidden':>6} {'tokens':>6} {'MiB':>6} | {'(a) ms':>7} {'ch':>3} {'(b) ms':>7} {'(c) ms':>7} "
        f"{'(d) ms':>7} | {'c/a':>5} {'c/b':>5} {'cont us':>7} {'a gpu GB/s':>10} | {'alt ms':>7} | "
        f"{'ipc a':>6} {'ipc b':>6} {'ipc gpu TB/s':>12} {'copy TB/s':>9}"
    )
    print(head)
    print("-" * len(head))
    summary = {"per_continuation_us": {}, "c_over_a": {}, "c_over_b": {}, "a_beats_d": {}, "same_gpu_256MiB": None}
    for r in rows:
        a, b, c = r["a"]["s"], r["b"]["s"], r["c"]["s"]
        d = (r.get("d") or {}).get("s", float("nan"))
        key = f"{r['hidden']}x{r['tokens']}"
        ph = r["a"].get("phases_us", {})
        conts = r["a"]["chunks"] - 1
        # receiver timeline: from the first CHUNK to the last receive posted, per continuation
        per_cont = (ph["posted"] - ph["first_chunk"]) / conts if conts > 0 and "posted" in ph else float("nan")
        if conts > 0:
            summary["per_continuation_us"][key] = per_cont
        summary["c_over_a"][key], summary["c_over_b"][key] = c / a, c / b
        if d == d:
            summary["a_beats_d"][key] = a < d
        a_gpu = ph.get("gpu_us", float("nan")) * 1e-6
        ipc_a = (r.get("ipc_a") or {}).get("s", float("nan"))
        ipc_b = (r.get("ipc_b") or {}).get("s", float("nan"))
        ipc_gpu = (r.get("ipc_b") or {}).get("phases_us", {}).get("gpu_us", float("nan")) * 1e-6
        copy = (r.get("copy") or {}).get("gpu_s", float("nan"))
        if r["bytes"] == 256 * 2**20:
            summary["same_gpu_256MiB"] = {
                "end_to_end_TBps": _gbps(r["bytes"], ipc_b) / 1e3,
                "transport_gpu_TBps": _gbps(r["bytes"], ipc_gpu) / 1e3,
                "raw_copy_TBps": _gbps(r["bytes"], copy) / 1e3,
                "ipc_b_ms": ipc_b * 1e3,
                "ipc_b_gpu_ms": ipc_gpu * 1e3,
            }
        print(
            f"{r['hidden']:>6} {r['tokens']:>6} {r['bytes'] / 2**20:>6.1f} | {a * 1e3:>7.3f} {r['a']['chunks']:>3} "
            f"{b * 1e3:>7.3f} {c * 1e3:>7.3f} {d * 1e3:>7.3f} | {c / a:>5.2f} {c / b:>5.2f} {per_cont:>7.1f} "
            f"{_gbps(r['bytes'], a_gpu):>10.1f} | {r['a_alt']['s'] * 1e3:>7.3f} | "
            f"{ipc_a * 1e3:>6.3f} {ipc_b * 1e3:>6.3f} "
            f"{_gbps(r['bytes'], ipc_gpu) / 1e3:>12.2f} {_gbps(r['bytes'], copy) / 1e3:>9.2f}"
        )
    print(
        f"(a) {args.landing} landing, default {WINDOW}-token window; (b) exact window; (c) raw NCCL, receive posted "
        "-> landed; (d) Triton BLS; c/a = share of raw NCCL bandwidth (a) reaches; cont us = receiver time per "
        "continuation (first CHUNK -> last receive posted, / continuations); a gpu GB/s = bytes / GPU time of (a) "
        "from first receive posted to last byte landed; alt = (a) with the other landing; ipc = same GPU"
    )
    print(
        "phases of (b), us from the pull's start (median): "
        + "; ".join(
            f"{r['hidden']}x{r['tokens']}: " + ",".join(f"{k}={v:.0f}" for k, v in r["b"].get("phases_us", {}).items())
            for r in rows
            if r["tokens"] in (256, 4096, 32768)
        )
    )
    return summary


def plot(rows, path: Path, info) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hiddens = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(2, len(hiddens), figsize=(6.5 * len(hiddens), 9), squeeze=False)
    series = [
        ("a", "(a) project, 1024-token window", "C0", "o-"),
        ("b", "(b) project, exact window", "C1", "s-"),
        ("c", "(c) raw NCCL send/recv", "C2", "^--"),
        ("d", "(d) Triton BLS, GPU output", "C3", "v-"),
        ("ipc_b", "same GPU: CUDA IPC, exact window", "C4", "d-"),
        ("copy", "same GPU: raw D2D copy", "C5", "x:"),
    ]
    for col, hidden in enumerate(hiddens):
        sub = [r for r in rows if r["hidden"] == hidden]
        mb = [r["bytes"] / 2**20 for r in sub]
        for key, label, color, style in series:
            field = "gpu_s" if key == "copy" else "s"
            ys = [((r.get(key) or {}).get(field, float("nan"))) for r in sub]
            if all(y != y for y in ys):
                continue
            axes[0][col].plot(mb, [y * 1e3 for y in ys], style, color=color, label=label)
            axes[1][col].plot(mb, [_gbps(r["bytes"], y) for r, y in zip(sub, ys)], style, color=color, label=label)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("embedding size (MiB, bf16)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("pull issued -> usable on receiver GPU (ms)")
        axes[1][col].set_ylabel("GB/s (bytes / time)")
        axes[0][col].set_title(f"hidden {hidden}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"GPU 0 -> GPU 1 transfer, {', '.join(info.get('gpus', [])[:2])}, NCCL {info.get('nccl')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
