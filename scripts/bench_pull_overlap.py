#!/usr/bin/env python3
"""Do embedding pulls slow down the engine's decode steps? Inter-token latency with and without pulls.

The entry point; the code is benchmarks/bench_pull_overlap.py (with the other benchmark code, not installed). --help
lists the options."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # benchmarks/ instead of this directory first on the path: the module there has this file's name
    sys.path[0] = str(Path(__file__).resolve().parent.parent / "benchmarks")
    from bench_pull_overlap import main

    sys.exit(main())
