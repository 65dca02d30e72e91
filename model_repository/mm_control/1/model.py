"""Triton entry point of mm_control; the logic lives in backends/mm_triton/control.py."""
import triton_python_backend_utils as pb_utils

from mm_triton.control import ControlModel


class TritonPythonModel(ControlModel):
    pb_utils = pb_utils
