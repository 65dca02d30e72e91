"""Triton entry point of mm_pipeline; the logic lives in backends/mm_triton/pipeline.py."""
import triton_python_backend_utils as pb_utils

from mm_triton.pipeline import PipelineModel


class TritonPythonModel(PipelineModel):
    pb_utils = pb_utils
