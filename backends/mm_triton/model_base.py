"""Common life cycle of the Python models: config, logging, metrics, error conversion.

A model's ``model.py`` subclasses one of the concrete models and sets ``pb_utils``;
everything else lives here, importable and readable without Triton.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from mmtransfer import TransferConfig

from .errors import triton_error
from .params import instance_device, model_parameters, resolve_checkpoint

log = logging.getLogger(__name__)


class ModelBase:
    """Parses config and parameters; subclasses build a service and answer one request."""

    pb_utils: Any = None  # set by model.py to the triton_python_backend_utils module
    needs_checkpoint = True  # False: a model that loads no weights (the pipelines) gets checkpoint None

    def initialize(self, args: dict[str, str]) -> None:
        logging.basicConfig(level=os.environ.get("MM_LOG_LEVEL", "INFO").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.instance_name = args.get("model_instance_name", self.model_name)
        self.params = model_parameters(self.model_config)
        self.transfer_config = TransferConfig.from_mapping(self.params)
        self.device = instance_device(args)
        model_dir = Path(args["model_repository"])
        self.checkpoint = resolve_checkpoint(self.params, model_dir) if self.needs_checkpoint else None
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def handle(self, request: Any, request_id: str) -> list[Any]:
        """Return the output tensors for one request; raise to answer with an error."""
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            try:
                responses.append(self.pb_utils.InferenceResponse(output_tensors=self.handle(request, request_id)))
            except Exception as exc:  # every request gets an answer; the instance keeps serving
                log.warning("%s: request %s failed: %s", self.instance_name, request_id, exc)
                responses.append(self.pb_utils.InferenceResponse(error=triton_error(self.pb_utils, exc)))
        return responses

    @staticmethod
    def cancellation_check(request: Any, min_interval_s: float = 0.02):
        """A cheap ``() -> bool`` telling whether the client cancelled ``request`` (gRPC cancel, or the
        ensemble that carries it was cancelled). ``request.is_cancelled()`` (Python backend >= 23.10) asks
        the server process over IPC, so answers are reused for ``min_interval_s``; once True it stays True.
        Backends without the call get a check that always says False."""
        probe = getattr(request, "is_cancelled", None)
        if probe is None:
            return lambda: False
        state = {"at": float("-inf"), "value": False}

        def cancelled() -> bool:
            if state["value"]:
                return True
            now = time.monotonic()
            if now - state["at"] >= min_interval_s:
                state["at"] = now
                try:
                    state["value"] = bool(probe())
                except Exception:  # noqa: BLE001 - a failed probe never fails the request
                    state["value"] = False
            return state["value"]

        return cancelled

    def int_param(self, name: str, default: int) -> int:
        raw = os.environ.get("MM_" + name.upper()) or self.params.get(name) or str(default)
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"parameter {name}: {raw!r} is not an integer") from None
