#!/usr/bin/env python3
"""Memory efficiency of the block pool: concurrent embeddings per pool byte, block allocator vs fixed slots.

The entry point; the code is benchmarks/bench_memory.py (with the other benchmark code, not installed). --help
lists the options."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # benchmarks/ instead of this directory first on the path: the module there has this file's name
    sys.path[0] = str(Path(__file__).resolve().parent.parent / "benchmarks")
    from bench_memory import main

    sys.exit(main())
