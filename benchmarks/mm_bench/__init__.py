"""Shared pieces of the benchmark scripts (scripts/bench_*.py): length mixes, result JSON with the
machine it came from, text/markdown tables, plots, perf_analyzer glue, process memory and metrics sampling.

No Triton, torch or matplotlib import at package import time; each module imports what it needs.
"""
