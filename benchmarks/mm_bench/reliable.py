"""A server that recovers from dead stubs, its processes (stubs, RSS), its pools, and raw requests with any
dtype or shape: what scripts/soak.py runs against, and the reliability tests too (through tests/reliability.py).

    with ReliableServer(env={"MM_TTL_S": "4"}) as rs:          # tritonserver + stub watchdog
        rs.kill_stub("mm_encoder")                              # SIGKILL the encoder's stub process
        rs.wait_serving()                                       # the watchdog reloaded it
        assert rs.wait_pools_empty() == {}                      # every pool whole again
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Iterable, Mapping

import numpy as np

from mm_params import tiny_model_dir
from mm_triton import procfs
from mm_triton.launcher import TritonServer
from mm_triton.prometheus import metric_value, parse_metrics
from mm_triton.server_env import DEFAULT_MODEL_REPOSITORY

PIPELINE_MODELS = ("mm_encoder", "mm_language", "mm_pipeline")
TINY_MODEL = tiny_model_dir()
_DTYPES = {
    np.object_: "BYTES",
    np.int32: "INT32",
    np.int64: "INT64",
    np.float32: "FP32",
    np.uint8: "UINT8",
    np.bool_: "BOOL",
}


def watchdog_server_args(models: Iterable[str] | None) -> list[str]:
    """Explicit model control with ``models`` (and mm_control, the watchdog's way to reload; default all),
    repository and shared-memory APIs closed to clients, as scripts/serve starts the server."""
    from mm_triton.watchdog import CONTROL_MODEL, server_args

    return server_args(None, None if models is None else list(dict.fromkeys([*models, CONTROL_MODEL])))


class ReliableServer:
    """A tritonserver of ``model_repository/`` with the tiny model and a StubWatchdog."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        models: Iterable[str] | None = PIPELINE_MODELS,
        log_file: str | os.PathLike | None = None,
        watchdog: bool = True,
        **kw: Any,
    ) -> None:
        args = list(kw.pop("args", ()))
        if watchdog:
            args += watchdog_server_args(models)
        elif models is not None:
            args += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in models]
        full_env = {"MM_CHECKPOINT": str(TINY_MODEL), **(env or {})}
        kw.setdefault("startup_timeout_s", 300)
        self.server = TritonServer(
            kw.pop("model_repository", DEFAULT_MODEL_REPOSITORY), env=full_env, args=args, log_file=log_file, **kw
        )
        self.watchdog = None
        self._use_watchdog = watchdog

    # ---- life ------------------------------------------------------------------------------------------
    def start(self) -> ReliableServer:
        self.server.start()
        if self._use_watchdog:
            from mm_triton.watchdog import StubWatchdog

            self.watchdog = StubWatchdog(self.server.pid, self.server.http_address, interval_s=0.25)
            self.watchdog.start()
        return self

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.server.stop()

    def __enter__(self) -> ReliableServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getattr__(self, name: str) -> Any:  # http_url, grpc_url, metrics(), log_text(), ...
        return getattr(self.server, name)

    # ---- processes ---------------------------------------------------------------------------------------
    def stubs(self) -> dict[str, int]:
        """{instance name: stub pid} of the live Python-backend stubs."""
        from mm_triton.watchdog import alive, list_stubs

        return {s.instance: s.pid for s in list_stubs(self.server.pid).values() if alive(s)}

    def stub_pid(self, model: str) -> int:
        pids = [pid for inst, pid in self.stubs().items() if inst.startswith(model + "_")]
        if not pids:
            raise RuntimeError(f"no live stub of {model}: {self.stubs()}")
        return pids[0]

    def kill_stub(self, model: str, sig: int = signal.SIGKILL) -> int:
        pid = self.stub_pid(model)
        os.kill(pid, sig)
        return pid

    def rss_bytes(self) -> int:
        """Resident memory of tritonserver and all its stubs."""
        return sum((procfs.rss_kib(pid) or 0) * 1024 for pid in [self.server.pid, *self.stubs().values()])

    # ---- health ---------------------------------------------------------------------------------------------
    def wait_serving(self, timeout_s: float = 120.0, models: Iterable[str] = PIPELINE_MODELS) -> float:
        """Wait until the watchdog has nothing to restart and the models are ready; returns seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        if self.watchdog is not None:
            time.sleep(2 * self.watchdog.interval_s)  # let it notice a stub that just died
            if not self.watchdog.wait_idle(timeout_s):
                raise TimeoutError(f"watchdog did not settle within {timeout_s}s: {self.watchdog.restarts}")
        while not all(self.server.model_ready(m) for m in models):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{list(models)} not ready within {timeout_s}s")
            time.sleep(0.1)
        return time.monotonic() - start

    def pools_used(self) -> dict[str, float]:
        """{instance: mm_pool_blocks_used} of every instance that reports a pool."""
        out = {}
        for (name, labels), value in self.server.metrics().items():
            if name == "mm_pool_blocks_used":
                out[dict(labels).get("instance", "?")] = value
        return out

    def wait_pools_empty(self, timeout_s: float = 15.0) -> dict[str, float]:
        """Wait until every pool is whole again; returns the instances still holding blocks (empty: none)."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = {k: v for k, v in self.pools_used().items() if v}
            if not held or time.monotonic() > deadline:
                return held
            time.sleep(0.1)

    def metric(self, name: str, default: float = 0.0, **labels: str) -> float:
        return metric_value(parse_metrics(self.server.metrics_text()), name, default, **labels)


# ---- raw requests -----------------------------------------------------------------------------------------
def tensors(module: Any, inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None) -> list:
    """tritonclient InferInputs for ``inputs`` ({name: array}); ``dtypes`` overrides the Triton datatype."""
    out = []
    for name, array in inputs.items():
        dtype = (dtypes or {}).get(name) or _DTYPES[array.dtype.type]
        t = module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def pipeline_inputs(
    images: list[bytes], prompt: bytes = b"Describe the image.", max_tokens: int | None = 4
) -> dict[str, np.ndarray]:
    inputs = {
        "IMAGE": np.array(images, dtype=np.object_).reshape(len(images)),
        "PROMPT": np.array([prompt], dtype=np.object_),
    }
    if max_tokens is not None:
        inputs["MAX_TOKENS"] = np.array([max_tokens], dtype=np.int32)
    return inputs


def error_text(exc: BaseException) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else ""
    return f"[{status}] {msg}"
