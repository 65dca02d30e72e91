"""Triton entry point of mm_encoder; the logic lives in backends/mm_encoder."""
import triton_python_backend_utils as pb_utils

from mm_encoder.triton_model import EncoderModel


class TritonPythonModel(EncoderModel):
    pb_utils = pb_utils
