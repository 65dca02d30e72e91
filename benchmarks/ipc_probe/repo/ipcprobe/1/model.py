"""What one pb_utils call costs inside a Python-backend stub (issue 13), and whether it releases the GIL.

Each call is timed alone (``plain``: microseconds per call) and beside a pure-Python thread counting as fast
as it can (``spun``: microseconds per call, and the counter's rate during the calls: ~0 means the call held
the GIL while it waited for tritonserver; the full rate means it released it, and then the caller waits up
to the interpreter's switch interval, 5 ms, to get it back). Answers one JSON document (decoupled model).
"""

import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _plain(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _spun(fn, n):
    state = {"stop": False, "count": 0}

    def spin():
        while not state["stop"]:
            state["count"] += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    c0, t0 = state["count"], time.perf_counter()
    for _ in range(n):
        fn()
    dt, c1 = time.perf_counter() - t0, state["count"]
    state["stop"] = True
    t.join()
    return dt / n * 1e6, (c1 - c0) / dt


def _timed(fn, n):
    return {"plain_us": _plain(fn, n), "spun_us_and_counter_per_s": _spun(fn, max(1, n // 5))}


def _answer(text):
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("Y", np.array([text.encode()], dtype=np.object_))]
    )


class TritonPythonModel:
    def initialize(self, args):
        import torch

        fam = pb_utils.MetricFamily
        self.families = [
            fam(name="probe_g", description="g", kind=fam.GAUGE),
            fam(name="probe_h", description="h", kind=fam.HISTOGRAM),
            fam(name="probe_c", description="c", kind=fam.COUNTER),
        ]
        self.gauge = self.families[0].Metric(labels={"a": "b"})
        self.hist = self.families[1].Metric(labels={"a": "b"}, buckets=[0.1, 1.0])
        self.counter = self.families[2].Metric(labels={"a": "b"})
        self.threads = {
            "torch_intra_op": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "affinity_cores": len(os.sched_getaffinity(0)),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            out = {"threads": self.threads, "sleep_100us": _timed(lambda: time.sleep(0.0001), 200)}
            out["gauge_set"] = _timed(lambda: self.gauge.set(1.0), 500)
            out["histogram_observe"] = _timed(lambda: self.hist.observe(0.5), 500)
            out["counter_increment"] = _timed(lambda: self.counter.increment(1), 500)
            out["is_cancelled"] = _timed(request.is_cancelled, 500)
            out["stream_send"] = _timed(lambda s=sender: s.send(_answer("x")), 300)
            sender.send(_answer(json.dumps(out)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
