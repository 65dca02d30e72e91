"""Every model parameter there is, from the config objects that read them: the catalogue the README's
configuration table is checked against (tests/unit/test_params.py), so no knob goes undocumented and no
documented knob is missing from the code.

Parameters of the config dataclasses are their fields (:class:`mmtransfer.TransferConfig`) or their declared
names (:data:`mm_engine.config.PARAM_NAMES`); the few a model reads by itself through ``ModelBase.resolver`` /
``int_param`` are declared here, with the models that read them. Each one is overridden by ``MM_<NAME>``.
"""

from __future__ import annotations

import dataclasses

#: Parameters read by the models themselves (not through a config dataclass): name -> the models reading it.
MODEL_PARAMETERS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("mm_encoder", "mm_language", "mm_monolithic"),
    "log_level": ("mm_encoder", "mm_language", "mm_monolithic", "mm_pipeline (language server)"),
    "max_image_pixels": ("mm_encoder", "mm_monolithic"),
    "max_pixels": ("mm_encoder", "mm_language", "mm_monolithic"),  # the per-image budget (mm_triton.image_budget)
    "min_pixels": ("mm_encoder", "mm_language", "mm_monolithic"),
    "encode_threads": ("mm_encoder",),
    "max_encode_batch_tokens": ("mm_encoder",),  # the encode batcher (mm_encoder.batcher)
    "max_encode_delay_ms": ("mm_encoder",),
    "cache_blocks": ("mm_encoder",),
    "max_tokens_limit": ("mm_language", "mm_monolithic"),
    "default_max_tokens": ("mm_language", "mm_monolithic"),
    "max_prompt_bytes": ("mm_language", "mm_monolithic"),
    "torch_threads": ("mm_encoder", "mm_language", "mm_monolithic"),  # mm_triton.cpu_threads
    "cancel_probe_interval_ms": ("mm_language", "mm_monolithic"),  # mm_triton.engine_model
    "max_request_bytes": ("mm_pipeline", "mm_pipeline_stream", "mm_monolithic", "mm_pipeline (language server)"),
    "max_image_bytes": ("mm_pipeline", "mm_pipeline_stream", "mm_monolithic", "mm_pipeline (language server)"),
    "max_inflight": ("mm_pipeline", "mm_pipeline_stream"),
    "pass_cancellation": ("mm_pipeline", "mm_pipeline_stream"),  # mm_triton.cancel_board
    "internal_access": ("mm_encoder", "mm_language", "mm_language_stream"),  # mm_triton.access
    "trusted_encoders": ("mm_language", "mm_language_stream"),  # mm_language.trust
    "encoder_urls": ("mm_pipeline (language server)",),
    "encoder_model": ("mm_pipeline (language server)",),
    "encoder_timeout_s": ("mm_pipeline (language server)",),
    "language_model": ("mm_pipeline (language server)",),
}


def transfer_parameters() -> set[str]:
    from mmtransfer import TransferConfig

    return {f.name for f in dataclasses.fields(TransferConfig)}


def engine_parameters() -> set[str]:
    from mm_engine.config import KV_CACHE_TOKENS_PARAM, PARAM_NAMES

    return {*PARAM_NAMES.values(), KV_CACHE_TOKENS_PARAM}


def all_parameters() -> set[str]:
    """Every config.pbtxt parameter name some model reads."""
    return transfer_parameters() | engine_parameters() | set(MODEL_PARAMETERS)
