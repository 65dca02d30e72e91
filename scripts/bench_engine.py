#!/usr/bin/env python3
"""Language-engine benchmark: requests/s, TTFT and inter-token latency, through Triton and in-process.

The entry point; the code is benchmarks/bench_engine.py (with the other benchmark code, not installed). --help
lists the options."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # benchmarks/ instead of this directory first on the path: the module there has this file's name
    sys.path[0] = str(Path(__file__).resolve().parent.parent / "benchmarks")
    from bench_engine import main

    sys.exit(main())
