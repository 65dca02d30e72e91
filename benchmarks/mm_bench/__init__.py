"""Shared pieces of the benchmarks (benchmarks/bench_*.py, run as scripts/bench_*.py), the soak and the tests:
length mixes, result JSON with the machine it came from, text/markdown tables, plots, perf_analyzer glue and a
Python load generator, process memory and metrics sampling, synthetic images (``images``), a dependency-free
KServe HTTP client (``kserve_http``) and the watchdog-backed server of the soak (``reliable``).

Not product code: this folder is not installed (pyproject.toml packages backends/ and client/ only); the entry
points and tests/conftest.py put benchmarks/ on sys.path. No Triton, torch or matplotlib import at package
import time; each module imports what it needs.
"""
