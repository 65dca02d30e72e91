"""Model package for encoder/language disaggregation of Qwen2-VL-family multimodal LLMs.

Importing ``mm_models`` is cheap: it pulls in neither torch nor transformers. The heavy parts live in
submodules:

- :mod:`mm_models.images`   -- safe decoding of user-supplied image bytes.
- :mod:`mm_models.geometry` -- image size <-> embedding-token arithmetic (no torch).
- :mod:`mm_models.prompt`   -- the chat prompt template and Qwen2-VL special tokens.
- :mod:`mm_models.chat`     -- OpenAI-shaped conversations (MESSAGES): validation, rendering with the
  checkpoint's chat template (every path: PROMPT, MESSAGES, the oracle).
- :mod:`mm_models.data_url` -- IMAGE elements given as base64 ``data:`` URLs (KServe v2 JSON clients).
- :mod:`mm_models.qwen2vl`  -- ``VisionEncoder`` (encoder side), ``LanguageModel`` (language side),
  ``MonolithicModel`` / ``monolithic_generate`` (the correctness oracle).
- :mod:`mm_models.tiny`     -- builds the tiny seeded Qwen2-VL checkpoint used by tests and defaults.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
