"""A sender endpoint on a chosen GPU in its own process, driven over queues (GPU tests, benchmark)."""

from __future__ import annotations

import os
import queue as queue_mod
import time

import torch


def embedding_for(seed: int, tokens: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic random [tokens, hidden] (made on the CPU: the same bits in every process)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=gen).to(dtype)


def gpu_sender_main(commands, replies, config, blocks: int, hidden: int, dtype_name: str, device: str) -> None:
    """Commands: ("register", seed, tokens) -> ref json (naming the pool rows when they fit); ("reserve_fill",
    seed, tokens) -> ref json without rows; ("register_fast", tokens) -> ref json (random
    data made on the GPU, for benchmarks); ("fragment", seed) -> held blocks; ("used",) -> used blocks;
    ("nccl_send", nbytes, nccl_id_hex) raw NCCL reference, see bench; ("stop",) -> used blocks."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from mmtransfer import BlockPool, SenderEndpoint, dtype_from_name

    dtype = dtype_from_name(dtype_name)
    torch.cuda.set_device(torch.device(device))
    pool = BlockPool(blocks, config.block_tokens, hidden, dtype, device, name=f"sender-{device}")
    sender = SenderEndpoint(pool, config, name=f"sender-{device}")
    held: list[list[int]] = []
    replies.put(("ready", sender.address))
    while True:
        try:
            cmd = commands.get(timeout=600)
        except queue_mod.Empty:
            break
        try:
            if cmd[0] == "register":
                data = embedding_for(cmd[1], cmd[2], hidden, dtype).to(device)
                ref = sender.register(data, {"grid_thw": [1, 2, cmd[2]]}, request_id=f"seed-{cmd[1]}")
                replies.put(("ok", ref.to_json()))
            elif cmd[0] == "reserve_fill":  # a ref without rows (published before the embedding was written)
                data = embedding_for(cmd[1], cmd[2], hidden, dtype).to(device)
                ref = sender.reserve(f"seed-{cmd[1]}", cmd[2])
                sender.fill(ref.transfer_id, data, {"grid_thw": [1, 2, cmd[2]]})
                replies.put(("ok", ref.to_json()))
            elif cmd[0] == "register_fast":
                data = torch.randn(cmd[1], hidden, device=device, dtype=torch.float32).to(dtype)
                checksum = int(data.view(torch.int16).to(torch.int64).sum().item())
                ref = sender.register(data)
                replies.put(("ok", (ref.to_json(), checksum)))
            elif cmd[0] == "fragment":
                import random

                rnd = random.Random(cmd[1])
                grabbed = []
                for _ in range(pool.total_blocks // 4):
                    ids = pool.alloc(rnd.choice([1, 2, 3]))
                    if ids is None:
                        break
                    grabbed.append(ids)
                for i, ids in enumerate(grabbed):
                    (held.append(ids) if i % 2 == 0 else pool.free(ids))
                replies.put(("ok", sum(len(h) for h in held)))
            elif cmd[0] == "unfragment":
                for ids in held:
                    pool.free(ids)
                held.clear()
                replies.put(("ok", None))
            elif cmd[0] == "used":
                deadline = time.monotonic() + 5  # deferred frees land within a tick of the server thread
                while pool.used_blocks - sum(len(h) for h in held) and time.monotonic() < deadline:
                    time.sleep(0.01)
                replies.put(("ok", pool.used_blocks - sum(len(h) for h in held)))
            elif cmd[0] == "stop":
                break
            else:
                replies.put(("error", f"unknown command {cmd[0]!r}"))
        except Exception as exc:  # report, keep serving
            replies.put(("error", f"{type(exc).__name__}: {exc}"))
    for ids in held:
        pool.free(ids)
    sender.close()
    replies.put(("stopped", pool.used_blocks))


class SenderProcess:
    """``gpu_sender_main`` in a spawned process; ``call`` sends a command and returns its answer."""

    def __init__(self, config, blocks: int, hidden: int, dtype_name: str, device: str, timeout_s: float = 120) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=gpu_sender_main,
            args=(self.commands, self.replies, config, blocks, hidden, dtype_name, device),
            daemon=True,
        )
        self.proc.start()
        kind, self.address = self.replies.get(timeout=timeout_s)
        assert kind == "ready", (kind, self.address)
        self.timeout_s = timeout_s

    def call(self, *cmd):
        self.commands.put(cmd)
        kind, value = self.replies.get(timeout=self.timeout_s)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def stop(self) -> int:
        self.commands.put(("stop",))
        try:
            kind, used = self.replies.get(timeout=60)
        except queue_mod.Empty:
            used = -1
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        return used
