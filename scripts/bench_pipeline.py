#!/usr/bin/env python3
"""End-to-end load test with perf_analyzer: disaggregated mm_pipeline vs colocated mm_monolithic.

The entry point; the code is benchmarks/bench_pipeline.py (with the other benchmark code, not installed). --help
lists the options."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # benchmarks/ instead of this directory first on the path: the module there has this file's name
    sys.path[0] = str(Path(__file__).resolve().parent.parent / "benchmarks")
    from bench_pipeline import main

    sys.exit(main())
