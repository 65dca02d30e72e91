import os
import ssl  # noqa: F401 - a stdlib C extension: fails when the stub's libpython and the stdlib are different builds
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Returns INPUT0 as OUTPUT0, TEXT_IN as TEXT_OUT, $HARNESS_ECHO_ENV as ENV, and
    PYINFO = [sys.version, sys.prefix, numpy.__file__] of the stub's interpreter."""

    def initialize(self, args):
        if os.environ.get("HARNESS_FAIL_INIT"):
            raise RuntimeError("initialize failed on purpose: " + os.environ["HARNESS_FAIL_INIT"])
        self.env = os.environ.get("HARNESS_ECHO_ENV", "")

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            t = pb_utils.get_input_tensor_by_name(request, "TEXT_IN")
            text = t.as_numpy() if t is not None else np.array([], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUTPUT0", x.astype(np.float32)),
                        pb_utils.Tensor("ENV", np.array([self.env.encode()], dtype=np.object_)),
                        pb_utils.Tensor("TEXT_OUT", text.astype(np.object_)),
                        pb_utils.Tensor(
                            "PYINFO",
                            np.array(
                                [sys.version.encode(), sys.prefix.encode(), np.__file__.encode()], dtype=np.object_
                            ),
                        ),
                    ]
                )
            )
        return responses
