#!/usr/bin/env python3
"""Fixed vs adaptive receive window: continuation rate and blocks held, on one length mix."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backends"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # mm_bench: not an installed package

from mm_bench.lengths import LogNormalMix, summarize  # noqa: E402
from mm_bench.report import int_list, machine_info, machine_line, table, write_json  # noqa: E402
from mm_bench.window import parse_policies, plan_policy, run_endpoints  # noqa: E402

DESCRIPTION = """\
Compares the receiver's window policies of mmtransfer.window (config window_policy = "fixed" | "adaptive")
on the same log-normal length mix. Each policy learns online (observe() after every transfer, as the
Receiver does). Two methods:

  endpoints  real mmtransfer SenderEndpoint -> Receiver in this process (host transport over loopback
             ZeroMQ, float32 CPU tensors of --hidden width, content verified), --transfers per run,
             for each --threads value (several threads share one receive pool of --pool-blocks, so
             windows shrink under pressure as in production);
  chunk_plan the same policies + mmtransfer.wire.chunk_plan arithmetic on --plan-samples lengths
             (no pool pressure; equals the 1-thread endpoint run on the same lengths).

Both with the length hint (EMBED_REF carries N: the normal path) and without (pull before N is known).
Reported: continuation rate (share of transfers needing >= 1 continuation), continuations per transfer,
mean window blocks held per transfer, block-chunks (window blocks x chunks), unused window tokens, and
for endpoint runs block-token-seconds (window tokens x transfer time) and transfer latency."""

EPILOG = """\
examples:
  scripts/bench_window.py                      full run (~1 minute on 2 cores), writes docs/benchmarks/window.{json,png}
  scripts/bench_window.py --quick --out-dir /tmp/b
  scripts/bench_window.py --policies fixed,adaptive:95 --adaptive-max-tokens 4096 --threads 1
"""


def policies(text: str):
    try:
        return parse_policies(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench_window.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--policies",
        type=policies,
        default=policies("fixed,adaptive:75,adaptive:90,adaptive:99"),
        help="comma-separated: fixed | adaptive[:percentile] (default fixed,adaptive:75,adaptive:90,adaptive:99)",
    )
    p.add_argument(
        "--mix",
        type=LogNormalMix.parse,
        default=LogNormalMix(),
        help="length mix 'median,sigma[,min,max]' (default 800,0.75,64,8192)",
    )
    p.add_argument("--transfers", type=int, default=2000, help="transfers per endpoint run (default 2000)")
    p.add_argument(
        "--threads",
        type=int_list,
        default=[1, 4],
        help="concurrent pulls sharing the receive pool, comma-separated (default 1,4)",
    )
    p.add_argument(
        "--plan-samples", type=int, default=100_000, help="lengths for the chunk_plan method (default 100000)"
    )
    p.add_argument("--hidden", type=int, default=64, help="embedding width of the endpoint runs (default 64)")
    p.add_argument("--block-tokens", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument("--window-tokens", type=int, default=1024, help="default (fixed) window (default 1024)")
    p.add_argument("--pool-blocks", type=int, default=64, help="receive pool blocks (default 64, as mm_language)")
    p.add_argument(
        "--adaptive-max-tokens", type=int, default=8192, help="upper bound of the adaptive window (default 8192)"
    )
    p.add_argument("--adaptive-min-samples", type=int, default=16, help="lengths seen before adapting (default 16)")
    p.add_argument("--no-hint-only", action="store_true", help="only the no-hint case")
    p.add_argument("--hint-only", action="store_true", help="only the hint case")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="CI size: 200 transfers, 1 thread, 10000 plan samples")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where window.json and window.png go (default docs/benchmarks)",
    )
    p.add_argument("--name", default="window", help="file name stem of the outputs (default window)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--markdown", action="store_true", help="print tables as markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.transfers, args.threads, args.plan_samples = min(args.transfers, 200), [1], min(args.plan_samples, 10_000)
    if args.hint_only and args.no_hint_only:
        p.error("--hint-only and --no-hint-only exclude each other")
    return args


ENDPOINT_COLUMNS = [
    ("policy", "policy"),
    ("hint_label", "hint"),
    ("threads", "thr"),
    ("continuation_rate", "cont. rate", ".1%"),
    ("continuations_per_transfer", "conts/xfer", ".3f"),
    ("mean_window_blocks", "blocks held", ".2f"),
    ("mean_block_chunks", "block-chunks", ".2f"),
    ("mean_unused_window_tokens", "unused win tok", ".0f"),
    ("block_token_seconds", "block-tok-s", ".1f"),
    ("mean_transfer_ms", "xfer ms", ".2f"),
    ("final_window_tokens", "final window"),
]
PLAN_COLUMNS = [c for c in ENDPOINT_COLUMNS if c[0] not in ("threads", "block_token_seconds", "mean_transfer_ms")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from mmtransfer import TransferConfig

    base = TransferConfig(
        block_tokens=args.block_tokens,
        default_window_tokens=args.window_tokens,
        pool_blocks=args.pool_blocks,
        max_embed_tokens=max(args.mix.max_tokens, 1),
        adaptive_max_window_tokens=args.adaptive_max_tokens,
        adaptive_min_samples=args.adaptive_min_samples,
        transport="host",  # one PULL per window: what the policies trade (shm copies every chunk at once)
    )
    hints = [h for h in (True, False) if not (args.hint_only and not h) and not (args.no_hint_only and h)]
    t0 = time.monotonic()
    lengths = args.mix.sample(args.transfers, seed=args.seed)
    plan_lengths = args.mix.sample(args.plan_samples, seed=args.seed + 1)
    endpoint_rows, plan_rows = [], []
    for hint in hints:
        for spec in args.policies:
            for threads in args.threads:
                row = run_endpoints(base, spec, lengths, hint, hidden=args.hidden, threads=threads)
                row["hint_label"] = "yes" if hint else "no"
                endpoint_rows.append(row)
            row = plan_policy(base, spec, plan_lengths, hint)
            row["hint_label"] = "yes" if hint else "no"
            plan_rows.append(row)
    info = machine_info()
    print_tables(args, endpoint_rows, plan_rows, info)
    payload = window_payload(args, argv, info, lengths, endpoint_rows, plan_rows, t0)
    print(f"wrote {write_json(args.out_dir / f'{args.name}.json', payload)}")
    if not args.no_plot:
        print(f"wrote {plot(endpoint_rows, args, info)}")
    leaks = [r for r in endpoint_rows if r["receiver_blocks_leaked"] or r["sender_blocks_leaked"]]
    if leaks:
        print(f"ERROR: blocks left allocated after {len(leaks)} run(s)", file=sys.stderr)
        return 1
    return 0


def print_tables(args, endpoint_rows: list[dict], plan_rows: list[dict], info: dict) -> None:
    print(
        f"length mix: {args.mix.describe()}; block {args.block_tokens} tokens, default window "
        f"{args.window_tokens}, receive pool {args.pool_blocks} blocks, adaptive bound {args.adaptive_max_tokens}"
    )
    print(f"\nreal endpoints ({args.transfers} transfers per run, hidden {args.hidden}):")
    print(table(endpoint_rows, ENDPOINT_COLUMNS, markdown=args.markdown))
    print(f"\nchunk_plan arithmetic ({args.plan_samples} lengths, no pool pressure):")
    print(table(plan_rows, PLAN_COLUMNS, markdown=args.markdown))
    print(f"\nmachine: {machine_line(info)}")


def window_payload(
    args, argv, info: dict, lengths, endpoint_rows: list[dict], plan_rows: list[dict], t0: float
) -> dict:
    return {
        "benchmark": "window",
        "command": "scripts/bench_window.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "mix": args.mix.to_dict(),
        "mix_summary": summarize(lengths),
        "config": {
            "block_tokens": args.block_tokens,
            "default_window_tokens": args.window_tokens,
            "pool_blocks": args.pool_blocks,
            "adaptive_max_window_tokens": args.adaptive_max_tokens,
            "adaptive_min_samples": args.adaptive_min_samples,
            "hidden": args.hidden,
        },
        "endpoints": endpoint_rows,
        "chunk_plan": plan_rows,
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


def plot(rows: list[dict], args: argparse.Namespace, info: dict) -> Path:
    from mm_bench.plotting import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    for ax, hint in zip(axes, ("yes", "no")):
        sub = [r for r in rows if r["hint_label"] == hint]
        if not sub:
            ax.set_visible(False)
            continue
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in sub)):
            for r in (r for r in sub if r["policy"] == policy):
                ax.scatter(
                    r["mean_window_blocks"],
                    r["continuation_rate"] * 100,
                    color=f"C{i}",
                    marker=markers.get(r["threads"], "x"),
                    s=50,
                    label=f"{policy}, {r['threads']} thr",
                )
        ax.set_xlabel("receive-window blocks held per transfer (mean)")
        ax.set_ylabel("transfers needing a continuation (%)")
        ax.set_title(f"length hint {'on (EMBED_REF carries N)' if hint == 'yes' else 'off (N unknown)'}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Fixed vs adaptive window: {args.mix.describe()}", fontsize=10)
    return save(fig, args.out_dir / f"{args.name}.png", footer=machine_line(info))


if __name__ == "__main__":
    sys.exit(main())
