"""A GPU sender endpoint in its own process that can be told to misbehave (tests/gpu/test_faults_gpu.py)."""

from __future__ import annotations

import os
import queue as queue_mod
import time

import torch

from ._procs import embedding_for


def fault_sender_main(commands, replies, config, blocks: int, hidden: int, dtype_name: str, device: str) -> None:
    """Commands: ("register", seed, tokens) -> ref json; ("drop_sends", n): the next n chunk sends post
    nothing (as if the sends were lost: the receiver's bytes never land); ("config", {knob: value}) changes the
    endpoint's TransferConfig; ("channels",) -> open channel count;
    ("used",) -> used blocks (waits up to 10 s for deferred frees); ("stop",) -> used blocks."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from mmtransfer import BlockPool, SenderEndpoint, dtype_from_name
    from mmtransfer.transports.nccl import NcclSenderLink

    dtype = dtype_from_name(dtype_name)
    torch.cuda.set_device(torch.device(device))
    pool = BlockPool(blocks, config.block_tokens, hidden, dtype, device, name=f"fault-sender-{device}")
    sender = SenderEndpoint(pool, config, name=f"fault-sender-{device}")
    drops = {"left": 0}
    real_send = NcclSenderLink.send

    def send(self, pieces):
        if drops["left"] > 0:
            drops["left"] -= 1
            self.ops += 1  # counted as sent: the pairing the receiver expects, with no bytes behind it
            return []
        return real_send(self, pieces)

    NcclSenderLink.send = send
    replies.put(("ready", sender.address))
    while True:
        try:
            cmd = commands.get(timeout=600)
        except queue_mod.Empty:
            break
        try:
            if cmd[0] == "register":
                data = embedding_for(cmd[1], cmd[2], hidden, dtype).to(device)
                replies.put(("ok", sender.register(data, {"grid_thw": [1, 2, cmd[2]]}).to_json()))
            elif cmd[0] == "drop_sends":
                drops["left"] = cmd[1]
                replies.put(("ok", None))
            elif cmd[0] == "config":  # ("config", {"ttl_s": 5.0}): change the endpoint's knobs
                sender.config = sender.config.replace(**cmd[1])
                replies.put(("ok", None))
            elif cmd[0] == "channels":
                replies.put(("ok", len(sender.channels.links)))
            elif cmd[0] == "used":
                deadline = time.monotonic() + 10
                while pool.used_blocks and time.monotonic() < deadline:
                    time.sleep(0.02)
                replies.put(("ok", pool.used_blocks))
            elif cmd[0] == "stop":
                break
            else:
                replies.put(("error", f"unknown command {cmd[0]!r}"))
        except Exception as exc:  # report, keep serving
            replies.put(("error", f"{type(exc).__name__}: {exc}"))
    sender.close()
    replies.put(("stopped", pool.used_blocks))
