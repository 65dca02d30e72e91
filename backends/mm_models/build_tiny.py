"""CLI: ``python -m mm_models.build_tiny --out DIR [--seed N]`` builds the tiny Qwen2-VL checkpoint.

Does nothing (quickly) when DIR already holds a complete checkpoint for the same seed.
Exit status 0 on success, 2 on a usage/validation error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_models.build_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to create")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    from .tiny import build_tiny_checkpoint, is_complete

    t0 = time.perf_counter()
    if is_complete(args.out, args.seed):  # fast path: no torch/transformers import
        print(f"tiny checkpoint already complete: {args.out}")
        return 0
    try:
        out = build_tiny_checkpoint(args.out, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built tiny checkpoint in {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
