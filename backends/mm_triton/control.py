"""Triton model ``mm_control`` (internal): the stub watchdog's way to reload a model, instead of Triton's
repository API.

    ACTION (BYTES [1]: "reload"), MODEL (BYTES [1]), MM_INTERNAL_TOKEN -> RESULT (BYTES [1])

Triton's repository API (load/unload, and with it uploading model files) and its shared-memory APIs are closed
to every client (:func:`mm_triton.watchdog.server_args` restricts them to a header value no client can send).
The watchdog, which runs next to the server as the same user, reads the per-server internal token from its
0600 file (:mod:`mm_triton.access`) and asks this model, which reloads through the Python backend's own model
loading API (``pb_utils.unload_model`` / ``load_model``, explicit model control). No credential is on a command
line or in an environment variable. Only models of this model's repository can be reloaded, never itself.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .access import InternalGate, server_token
from .errors import triton_error
from .tensors import one_string

log = logging.getLogger(__name__)
UNLOAD_TIMEOUT_S = 120.0


class ControlModel:
    pb_utils: Any = None  # set by model.py

    def initialize(self, args: dict[str, str]) -> None:
        logging.basicConfig(
            level=os.environ.get("MM_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        self.model_name = args["model_name"]
        self.gate = InternalGate(self.model_name, server_token())  # always closed, whatever the config
        repository = Path(args["model_repository"]).resolve().parent
        self.models = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()} - {self.model_name}

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb_utils
        responses = []
        for request in requests:
            try:
                self.gate.check(pb, request)
                result = self.handle(one_string(pb, request, "ACTION"), one_string(pb, request, "MODEL"))
                responses.append(
                    pb.InferenceResponse(
                        output_tensors=[pb.Tensor("RESULT", np.array([result.encode()], dtype=np.object_))]
                    )
                )
            except Exception as exc:  # every request gets an answer
                log.warning("%s: %s", self.model_name, exc)
                responses.append(pb.InferenceResponse(error=triton_error(pb, exc)))
        return responses

    def handle(self, action: str, model: str) -> str:
        if action != "reload":
            raise ValueError(f"ACTION: unknown action {action!r} (reload)")
        if model not in self.models:
            raise ValueError(f"MODEL: {model!r} is not a model this server can reload")
        start = time.monotonic()
        log.warning("%s: reloading %s (the watchdog found a dead stub)", self.model_name, model)
        self.pb_utils.unload_model(model)
        while self.pb_utils.is_model_ready(model) and time.monotonic() - start < UNLOAD_TIMEOUT_S:
            time.sleep(0.05)
        self.pb_utils.load_model(model)
        return f"reloaded {model} in {time.monotonic() - start:.1f}s"

    def finalize(self) -> None:
        pass
