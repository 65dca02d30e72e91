import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """The language model's stand-in: ITERS times, a BLS call to bench_producer, then the embedding made
    usable on this instance's GPU; returns each time (pull issued -> usable here) and where it arrived."""

    def initialize(self, args):
        self.device = torch.device("cuda", int(args["model_instance_device_id"]))

    def execute(self, requests):
        out = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "TOKENS").as_numpy().astype(np.int32)
            h = pb_utils.get_input_tensor_by_name(request, "HIDDEN").as_numpy().astype(np.int32)
            iters = int(pb_utils.get_input_tensor_by_name(request, "ITERS").as_numpy()[0])
            times, where = [], ""
            kwargs = {}
            if hasattr(pb_utils, "PreferredMemory"):
                kwargs["preferred_memory"] = pb_utils.PreferredMemory(
                    pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index
                )
            for _ in range(iters):
                t0 = time.perf_counter()
                resp = pb_utils.InferenceRequest(
                    model_name="bench_producer",
                    requested_output_names=["EMB"],
                    inputs=[pb_utils.Tensor("TOKENS", n), pb_utils.Tensor("HIDDEN", h)],
                    **kwargs,
                ).exec()
                if resp.has_error():
                    raise pb_utils.TritonModelException(resp.error().message())
                t = pb_utils.get_output_tensor_by_name(resp, "EMB")
                where = "gpu" if not t.is_cpu() else "cpu"
                emb = torch.from_dlpack(t.to_dlpack())
                emb = emb.to(self.device, non_blocking=True).view(torch.bfloat16)
                torch.cuda.current_stream(self.device).synchronize()
                times.append(time.perf_counter() - t0)
                where += f"->{emb.device}"
            out.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("TIMES", np.array(times, dtype=np.float64)),
                        pb_utils.Tensor("WHERE", np.array([where.encode()], dtype=np.object_)),
                    ]
                )
            )
        return out
