#!/usr/bin/env python3
"""Memory efficiency of the block pool: concurrent embeddings per pool byte, block allocator vs fixed slots."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "backends"))  # runnable without the editable install too
sys.path.insert(0, str(ROOT / "benchmarks"))  # mm_bench: not an installed package

from mm_bench.lengths import LogNormalMix, summarize  # noqa: E402
from mm_bench.memory import DTYPE_BYTES, PoolGeometry, compare  # noqa: E402
from mm_bench.report import int_list, machine_info, machine_line, table, write_json  # noqa: E402

DESCRIPTION = """\
For a log-normal embedding-length mix, how many embeddings fit concurrently in a pool of fixed bytes
with the block allocator (ceil(N/block) blocks per embedding, mmtransfer.BlockAllocator) versus the
index-based baseline (one max-size slot per embedding, mmtransfer.FixedSlotAllocator), and the average
internal waste per request. Real components: mmtransfer.BlockPool (on the meta device: no memory is
used), its allocators and BlockPool.blocks_for. A trial fills an empty pool in arrival order until the
first embedding that does not fit; the table shows the mean over --trials trials.

Targets (issue 5): >= 2x more concurrent embeddings than fixed slots at equal memory, and average waste
<= half a block. --check exits 1 when a target is missed."""

EPILOG = """\
examples:
  scripts/bench_memory.py                       full run (~1 minute on 2 cores): docs/benchmarks/memory.{json,png}
  scripts/bench_memory.py --quick --out-dir /tmp/b
  scripts/bench_memory.py --hidden 3584 --pool-mib 512,2048    Qwen2-VL-7B width
  scripts/bench_memory.py --mix 1500,0.9,64,16384 --slot-tokens 16384
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench_memory.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pool-mib",
        type=int_list,
        default=[64, 256, 1024],
        help="pool sizes in MiB, comma-separated (default 64,256,1024)",
    )
    p.add_argument(
        "--block-tokens",
        type=int_list,
        default=[64, 128, 256],
        help="block sizes in tokens; the first pool size is also run with each (default 64,128,256; "
        "128 is the product default)",
    )
    p.add_argument("--hidden", type=int, default=1536, help="embedding width (default 1536 = Qwen2-VL-2B)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16", help="element type (default bfloat16)")
    p.add_argument(
        "--slot-tokens",
        type=int,
        default=8192,
        help="fixed-slot size in tokens = the largest embedding accepted (default 8192 = max_embed_tokens)",
    )
    p.add_argument(
        "--mix",
        type=LogNormalMix.parse,
        default=LogNormalMix(),
        help="length mix 'median,sigma[,min,max]' (default 800,0.75,64,8192)",
    )
    p.add_argument("--trials", type=int, default=200, help="fills per configuration (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="CI size: 20 trials, 1 pool size, 1 block size")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where memory.json and memory.png go (default docs/benchmarks)",
    )
    p.add_argument("--name", default="memory", help="file name stem of the outputs (default memory)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.pool_mib, args.block_tokens = min(args.trials, 20), args.pool_mib[:1], [128]
    if args.mix.max_tokens > args.slot_tokens:
        p.error(f"--slot-tokens {args.slot_tokens} is smaller than the mix's largest length {args.mix.max_tokens}")
    return args


COLUMNS = [
    ("pool_mib", "pool MiB", ".0f"),
    ("block_tokens", "block"),
    ("pool_blocks", "blocks"),
    ("block_fit_mean", "fit (blocks)", ".1f"),
    ("slot_fit_mean", "fit (slots)", ".1f"),
    ("ratio", "ratio", ".2f"),
    ("block_token_utilisation", "util blocks", ".1%"),
    ("slot_token_utilisation", "util slots", ".1%"),
    ("block_waste_mean_tokens", "waste/req blocks (tok)", ".1f"),
    ("block_waste_mean_blocks", "= blocks", ".3f"),
    ("slot_waste_mean_tokens", "waste/req slots (tok)", ".0f"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    configs = [(mib, 128 if 128 in args.block_tokens else args.block_tokens[0]) for mib in args.pool_mib]
    configs += [(args.pool_mib[0], b) for b in args.block_tokens if (args.pool_mib[0], b) not in configs]
    rows = []
    for mib, block in configs:
        geom = PoolGeometry(mib * 2**20, args.hidden, args.dtype, block)
        rows.append(compare(geom, args.mix, args.slot_tokens, trials=args.trials, seed=args.seed))
    info = machine_info()
    default_rows = [r for r in rows if r["block_tokens"] == 128] or rows
    ratio_ok = all(r["ratio"] >= 2.0 for r in default_rows)
    waste_ok = all(r["block_waste_mean_blocks"] <= 0.5 for r in rows)
    print(f"length mix: {args.mix.describe()}; hidden {args.hidden} {args.dtype}; fixed slot {args.slot_tokens} tokens")
    print(table(rows, COLUMNS, markdown=args.markdown))
    print(
        f"target >= 2x concurrent embeddings (block 128): {'MET' if ratio_ok else 'MISSED'} "
        f"(min ratio {min(r['ratio'] for r in default_rows):.2f}); "
        f"target waste <= 0.5 block: {'MET' if waste_ok else 'MISSED'} "
        f"(max {max(r['block_waste_mean_blocks'] for r in rows):.3f} block)"
    )
    print(f"machine: {machine_line(info)}")
    payload = {
        "benchmark": "memory",
        "command": "scripts/bench_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "mix": args.mix.to_dict(),
        "mix_summary": summarize(args.mix.sample(100_000, args.seed + 7)),
        "hidden": args.hidden,
        "dtype": args.dtype,
        "slot_tokens": args.slot_tokens,
        "trials": args.trials,
        "rows": rows,
        "targets": {"ratio_ge_2x": ratio_ok, "waste_le_half_block": waste_ok},
        "elapsed_s": round(time.monotonic() - t0, 2),
    }
    out_json = write_json(args.out_dir / f"{args.name}.json", payload)
    print(f"wrote {out_json}")
    if not args.no_plot:
        print(f"wrote {plot(rows, args, info)}")
    return 0 if (ratio_ok and waste_ok) or not args.check else 1


def plot(rows: list[dict], args: argparse.Namespace, info: dict) -> Path:
    import numpy as np

    from mm_bench.plotting import pyplot, save

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by_pool = sorted(
        (r for r in rows if r["block_tokens"] == (128 if 128 in args.block_tokens else args.block_tokens[0])),
        key=lambda r: r["pool_mib"],
    )
    x = np.arange(len(by_pool))
    ax1.bar(x - 0.2, [r["block_fit_mean"] for r in by_pool], 0.4, label="block allocator (128-token blocks)")
    ax1.bar(x + 0.2, [r["slot_fit_mean"] for r in by_pool], 0.4, label=f"fixed slots ({args.slot_tokens} tokens)")
    for i, r in enumerate(by_pool):
        ax1.annotate(f"{r['ratio']:.1f}x", (i - 0.2, r["block_fit_mean"]), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, [f"{r['pool_mib']:.0f} MiB\n({r['pool_blocks']} blocks)" for r in by_pool])
    ax1.set_ylabel("embeddings held concurrently (mean)")
    ax1.set_title(f"Pool of fixed bytes, hidden {args.hidden} {args.dtype}")
    ax1.legend(fontsize=8)
    lengths = args.mix.sample(100_000, args.seed + 7)
    ax2.hist(lengths, bins=np.arange(0, args.mix.max_tokens + 129, 128), color="0.6")
    ax2.axvline(1024, color="C3", ls="--", label="default window 1024")
    ax2.set_xlabel("embedding tokens (128-token bins)")
    ax2.set_ylabel("requests")
    waste = ", ".join(
        f"{r['block_tokens']}: {r['block_waste_mean_tokens']:.0f} tok"
        for r in rows
        if r["pool_mib"] == args.pool_mib[0]
    )
    ax2.set_title("Length mix; mean waste/request by block size\n" + waste, fontsize=9)
    ax2.legend(fontsize=8)
    ax2.set_xlim(0, min(args.mix.max_tokens, 6000))
    return save(fig, args.out_dir / f"{args.name}.png", footer=machine_line(info))


if __name__ == "__main__":
    sys.exit(main())
