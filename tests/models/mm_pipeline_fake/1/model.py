import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stand-in for the mm_pipeline ensemble: same inputs/outputs, no model.

    TEXT = "images=<n> bytes=<sizes> prompt=<prompt> max_tokens=<m>", TOKEN_IDS = 0..m-1 (m defaults to 4).
    A prompt starting with "FAIL" returns an INVALID_ARG error (HTTP 400) carrying the prompt, one starting with
    "CRASH" an INTERNAL error (HTTP 500)."""

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0].decode()
            mt = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
            max_tokens = int(mt.as_numpy().reshape(-1)[0]) if mt is not None else None
            if prompt.startswith("FAIL"):
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("bad prompt: " + prompt, pb_utils.TritonError.INVALID_ARG)
                    )
                )
                continue
            if prompt.startswith("CRASH"):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("internal: " + prompt)))
                continue
            sizes = ",".join(str(len(b)) for b in images)
            text = f"images={len(images)} bytes={sizes} prompt={prompt} max_tokens={max_tokens}"
            ids = np.arange(max_tokens if max_tokens is not None else 4, dtype=np.int64)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("TEXT", np.array([text.encode()], dtype=np.object_)),
                        pb_utils.Tensor("TOKEN_IDS", ids),
                    ]
                )
            )
        return responses
