"""Triton entry point of mm_monolithic_stream (decoupled twin of mm_monolithic); the logic lives in backends/mm_monolithic."""
import triton_python_backend_utils as pb_utils

from mm_monolithic.triton_model import MonolithicModelTriton


class TritonPythonModel(MonolithicModelTriton):
    pb_utils = pb_utils
