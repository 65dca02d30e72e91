#!/usr/bin/env python3
"""Fixed vs adaptive receive window: continuation rate and blocks held, on one length mix.

The entry point; the code is benchmarks/bench_window.py (with the other benchmark code, not installed). --help
lists the options."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # benchmarks/ instead of this directory first on the path: the module there has this file's name
    sys.path[0] = str(Path(__file__).resolve().parent.parent / "benchmarks")
    from bench_window import main

    sys.exit(main())
