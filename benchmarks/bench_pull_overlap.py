#!/usr/bin/env python3
"""Do embedding pulls slow down the engine's decode steps? Inter-token latency with and without pulls."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backends"))
from mm_params import tiny_model_dir  # noqa: E402

DESCRIPTION = """\
The language engine pulls embeddings on its loader threads while its loop decodes. This measures what that
costs the running sequences: --batch sequences decode --decode-tokens tokens each (no images) in a
LLMEngine, once alone and once while --pull-threads threads of this process pull --embed-tokens-token
embeddings (host transport, or CUDA IPC on one GPU) from a sender endpoint in ANOTHER process (as the encoder
is), back to back (or at --pull-rate), for the whole decode. The receive side is exactly mm_language's
(Receiver + PullLoader into a BlockPool on --device). Reported: inter-token latency p50 / p99 / mean of the
decoding sequences in both phases, and the pulls and GB/s that ran during the second."""


def sender_main(refs, stop, device: str, hidden: int, dtype: str, tokens: int, inflight: int) -> None:
    """Keep ``inflight`` registered, unpulled embeddings of ``tokens`` tokens available in ``refs``."""
    import torch

    from mmtransfer import BlockPool, SenderEndpoint, TransferConfig, dtype_from_name

    per = (tokens + 127) // 128
    blocks = inflight * per + 8
    # host, as measured in docs/BENCHMARKS.md (on one host mm_language now pulls over shm)
    cfg = TransferConfig(block_tokens=128, max_embed_tokens=max(8192, tokens), pool_blocks=blocks, transport="host")
    pool = BlockPool(blocks, 128, hidden, dtype_from_name(dtype), device, name="overlap-sender")
    sender = SenderEndpoint(pool, cfg, name="overlap-sender")
    data = torch.randn(tokens, hidden).to(dtype_from_name(dtype)).to(device)
    while not stop.is_set():
        if refs.qsize() < inflight and pool.total_blocks - pool.used_blocks >= per:
            refs.put(sender.register(data, {"grid_thw": [1, 2, 2 * tokens]}).to_json())
        else:
            time.sleep(0.001)
    sender.close()


def decode_phase(engine, lm, args, pulling: threading.Event | None = None) -> list[float]:
    """Run --batch sequences to --decode-tokens tokens; the gaps (ms) between tokens of each."""
    from mm_engine.api import GenerationRequest, ResponseSink, SamplingParams

    class Sink(ResponseSink):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.done = threading.Event()

        def on_tokens(self, token_ids, text_delta) -> None:
            if token_ids:
                self.stamps.append(time.perf_counter())

        def on_finish(self, output) -> None:
            self.done.set()

        def on_error(self, error) -> None:
            print("error:", error, file=sys.stderr)
            self.done.set()

    sinks = [Sink() for _ in range(args.batch)]
    for i, sink in enumerate(sinks):
        ids = lm.build_input_ids(f"Tell a long story, number {i}.", [])
        engine.submit(GenerationRequest(f"d{i}", ids, [], None, SamplingParams(max_tokens=args.decode_tokens)), sink)
    for sink in sinks:
        sink.done.wait(600)
    # the first gaps include the other sequences' prefill: keep the steady decode only
    return [(b - a) * 1000 for s in sinks for a, b in zip(s.stamps[5:], s.stamps[6:])]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench_pull_overlap.py", description=DESCRIPTION)
    p.add_argument("--checkpoint", type=Path, default=tiny_model_dir())
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4, help="decoding sequences")
    p.add_argument("--decode-tokens", type=int, default=400)
    p.add_argument("--pull-threads", type=int, default=4, help="as the engine's default loader_threads")
    p.add_argument("--embed-tokens", type=int, default=4096)
    p.add_argument(
        "--pull-rate",
        type=float,
        default=0.0,
        help="pulls per second over all threads (0: back to back, the worst case)",
    )
    return p.parse_args(argv)


def decode_with_pulls(engine, lm, args, receiver, refs) -> tuple[list[float], float, tuple[int, int]]:
    """A decode phase while --pull-threads threads pull embeddings: (inter-token gaps in ms, seconds,
    (pulls, bytes) during it)."""
    from mm_language.loader import PullLoader
    from mmtransfer import EmbedRef

    pulled, nbytes, running = [0], [0], threading.Event()
    running.set()
    gap = args.pull_threads / args.pull_rate if args.pull_rate > 0 else 0.0

    def puller() -> None:
        while running.is_set():
            if gap:
                time.sleep(gap)
            try:
                ref = EmbedRef.from_json(refs.get(timeout=0.5))
            except queue.Empty:
                continue
            images = PullLoader(receiver, [ref], "overlap").load(lambda: False)
            pulled[0] += 1
            nbytes[0] += images[0].embeds.numel() * images[0].embeds.element_size()

    threads = [threading.Thread(target=puller, daemon=True) for _ in range(args.pull_threads)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # pulls in full swing
    t0, before = time.perf_counter(), (pulled[0], nbytes[0])
    busy = decode_phase(engine, lm, args)
    span = time.perf_counter() - t0
    during = (pulled[0] - before[0], nbytes[0] - before[1])
    running.clear()
    for t in threads:
        t.join(5)
    return busy, span, during


def report(args, lm, alone: list[float], busy: list[float], span: float, during: tuple[int, int]) -> None:
    import numpy as np

    def stats(v):
        a = np.asarray(v)
        return f"p50 {np.percentile(a, 50):.2f} ms, p99 {np.percentile(a, 99):.2f} ms, mean {a.mean():.2f} ms"

    rate = f"{args.pull_rate:g} pulls/s" if args.pull_rate > 0 else "back to back"
    print(
        f"device {args.device}, {args.batch} decoding sequences, {args.pull_threads} pull threads ({rate}), "
        f"{args.embed_tokens}-token embeddings (hidden {lm.hidden_size}, {lm.dtype})"
    )
    print(f"  inter-token latency alone:       {stats(alone)}")
    print(f"  inter-token latency with pulls:  {stats(busy)}")
    print(f"  pulls during the decode: {during[0]} in {span:.2f} s ({during[1] / span / 1e9:.2f} GB/s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mm_engine.config import EngineConfig
    from mm_engine.engine import LLMEngine
    from mm_models.qwen2vl import LanguageModel
    from mmtransfer import BlockPool, Receiver, TransferConfig
    from mmtransfer.pool import DTYPE_NAMES

    lm = LanguageModel.from_pretrained(args.checkpoint, device=args.device)
    engine = LLMEngine(
        lm.hf_model, lm.tokenizer, EngineConfig(max_batch_size=max(8, args.batch), max_seq_len=2048, device=args.device)
    )
    dtype = DTYPE_NAMES[lm.dtype]
    ctx = mp.get_context("spawn")
    refs, stop = ctx.Queue(), ctx.Event()
    sender = ctx.Process(
        target=sender_main,
        args=(refs, stop, args.device, lm.hidden_size, dtype, args.embed_tokens, 2 * args.pull_threads),
        daemon=True,
    )
    sender.start()
    cfg = TransferConfig(
        block_tokens=128, pool_blocks=64, max_embed_tokens=max(8192, args.embed_tokens), transport="host"
    )
    receiver = Receiver(BlockPool(64, 128, lm.hidden_size, lm.dtype, args.device, name="overlap-rx"), cfg)
    try:
        decode_phase(engine, lm, args)  # warm
        alone = decode_phase(engine, lm, args)
        busy, span, during = decode_with_pulls(engine, lm, args, receiver, refs)
    finally:
        stop.set()
        engine.close()
        receiver.close()
        sender.join(10)
    report(args, lm, alone, busy, span, during)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
