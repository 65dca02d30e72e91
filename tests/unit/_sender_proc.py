"""A sender endpoint living in its own process, driven by the tests over a queue."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod

import torch

from mmtransfer import BlockPool, SenderEndpoint, TransferConfig, dtype_from_name


def embedding_for(seed: int, tokens: int, hidden: int, dtype: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=gen).to(dtype_from_name(dtype))


def sender_main(commands, replies, config: TransferConfig, blocks: int, hidden: int, dtype: str) -> None:
    """Commands: ("register", seed, tokens) -> ref json; ("reserve",) -> ref json;
    ("fill", tid, seed, tokens); ("used",) -> used blocks; ("unread",) -> the largest number of payload bytes
    queued to one receiver and not confirmed read; ("stop",) -> used blocks."""
    pool = BlockPool(blocks, config.block_tokens, hidden, dtype_from_name(dtype), name="proc-sender")
    sender = SenderEndpoint(pool, config, name="proc-sender")
    replies.put(("ready", sender.address))
    while True:
        try:
            cmd = commands.get(timeout=120)
        except queue_mod.Empty:
            break
        try:
            if cmd[0] == "register":
                ref = sender.register(
                    embedding_for(cmd[1], cmd[2], hidden, dtype),
                    {"grid_thw": [1, 2, cmd[2]]},
                    request_id=f"seed-{cmd[1]}",
                )
                replies.put(("ok", ref.to_json()))
            elif cmd[0] == "reserve":
                replies.put(("ok", sender.reserve("reserved").to_json()))
            elif cmd[0] == "fill":
                sender.fill(cmd[1], embedding_for(cmd[2], cmd[3], hidden, dtype))
                replies.put(("ok", None))
            elif cmd[0] == "used":
                replies.put(("ok", pool.used_blocks))
            elif cmd[0] == "unread":
                replies.put(("ok", max(sender.table.unread.values(), default=0)))
            elif cmd[0] == "stop":
                break
        except Exception as exc:  # report, keep serving
            replies.put(("error", f"{type(exc).__name__}: {exc}"))
    sender.close()
    replies.put(("stopped", pool.used_blocks))


class SenderProcess:
    """A ``sender_main`` in a spawned process (its own RSS, its own ZeroMQ queues)."""

    def __init__(self, config: TransferConfig, blocks: int, hidden: int, dtype: str) -> None:
        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=sender_main, args=(self.commands, self.replies, config, blocks, hidden, dtype), daemon=True
        )
        self.proc.start()
        kind, self.address = self.replies.get(timeout=60)
        assert kind == "ready"

    def call(self, *cmd):
        self.commands.put(cmd)
        kind, value = self.replies.get(timeout=60)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def stop(self) -> int:
        self.commands.put(("stop",))
        kind, used = self.replies.get(timeout=30)
        self.proc.join(timeout=10)
        return used
