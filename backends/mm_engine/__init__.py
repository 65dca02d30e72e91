"""Language serving engine: in-flight batching over a preallocated KV cache (see api.py for the contract)."""
