"""The dependency-free KServe v2 HTTP client of the GPU tests: benchmarks/mm_bench/kserve_http.py (the GPU
machine has no tritonclient wheel; the benchmarks use the same client)."""

from mm_bench.kserve_http import InferError, infer

__all__ = ["InferError", "infer"]
