"""Glue shared by the Triton Python models: parameters, request tensors, errors, metrics.

Only this package (and the thin ``model.py`` files) touch ``triton_python_backend_utils``;
the services in ``mm_encoder`` and ``mm_language`` stay testable without Triton.
"""
