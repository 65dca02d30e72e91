"""Triton entry point of the language server's mm_pipeline (BLS); the logic lives in backends/mm_remote."""
import triton_python_backend_utils as pb_utils

from mm_remote.triton_model import RemotePipelineModel


class TritonPythonModel(RemotePipelineModel):
    pb_utils = pb_utils
