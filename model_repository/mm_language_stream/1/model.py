"""Triton entry point of mm_language_stream (decoupled twin of mm_language); the logic lives in backends/mm_language."""
import triton_python_backend_utils as pb_utils

from mm_language.triton_model import LanguageModelTriton


class TritonPythonModel(LanguageModelTriton):
    pb_utils = pb_utils
