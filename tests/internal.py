"""White-box calls to the internal models: benchmarks/mm_bench/internal.py (shared with scripts/soak.py), under
the names the tests import."""

from mm_bench.internal import INTERNAL_MODELS, TOKEN_INPUT, internal_token, with_token

__all__ = ["INTERNAL_MODELS", "TOKEN_INPUT", "internal_token", "with_token"]
