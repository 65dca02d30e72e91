"""The reliability tests' server and request helpers: benchmarks/mm_bench/reliable.py (shared with
scripts/soak.py), under the names the tests import."""

from mm_bench.reliable import PIPELINE_MODELS, TINY_MODEL, ReliableServer, error_text, pipeline_inputs, tensors

__all__ = ["PIPELINE_MODELS", "TINY_MODEL", "ReliableServer", "error_text", "pipeline_inputs", "tensors"]
