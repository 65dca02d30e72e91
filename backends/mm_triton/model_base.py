"""Common life cycle of the Python models: config, parameters, logging, error conversion.

A model's ``model.py`` subclasses one of the concrete models and sets ``pb_utils``;
everything else lives here, importable and readable without Triton.

Every parameter goes through one resolver, ``self.resolver`` (:class:`mm_params.Params`: config.pbtxt
``parameters``, ``MM_<NAME>`` environment overrides, parsing and validation). The transfer knobs and the
checkpoint are resolved the first time a model asks for them, so a model that needs neither (the language
server's BLS ``mm_pipeline``) never imports torch or the transfer library.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import json
import logging
import time
import uuid
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_params import Params

from .heartbeat import close as close_heartbeat
from .heartbeat import heartbeat, marked
from .params import instance_device, model_parameters, resolve_checkpoint

if TYPE_CHECKING:
    from mm_models.geometry import ImageGeometry
    from mmtransfer import TransferConfig

log = logging.getLogger(__name__)


class ModelBase:
    """Parses config and parameters; subclasses build a service and answer one request."""

    pb_utils: Any = None  # set by model.py to the triton_python_backend_utils module
    needs_checkpoint = True  # False: a model that loads no weights (the pipelines): checkpoint is None
    uses_torch = False  # True: the models running torch (encoder, engines) set its threads (torch_threads)

    def __init_subclass__(cls, **kw: Any) -> None:
        """Every model's own ``execute`` marks the stub's heartbeat (mm_triton.heartbeat): the watchdog
        restarts a stub stuck in one call for longer than its ``hang_s``."""
        super().__init_subclass__(**kw)
        execute = cls.__dict__.get("execute")
        if execute is not None and not getattr(execute, "__mm_heartbeat__", False):
            cls.execute = marked(execute)
        finalize = cls.__dict__.get("finalize")
        if finalize is not None and not getattr(finalize, "__mm_heartbeat__", False):
            cls.finalize = _closing_heartbeat(finalize)

    def initialize(self, args: dict[str, str]) -> None:
        self.model_config = json.loads(args["model_config"])
        self.params = model_parameters(self.model_config)
        self.resolver = Params(self.params)
        logging.basicConfig(
            level=self.resolver.str("log_level", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        # A stub that crashes (SIGSEGV, SIGABRT) leaves every thread's Python stack in the server's log
        # (the stub's stderr is tritonserver's); without it Triton only reports the stub "not healthy".
        faulthandler.enable(all_threads=True)
        self.model_name = args["model_name"]
        self.instance_name = args.get("model_instance_name", self.model_name)
        self.device = instance_device(args)
        if self.uses_torch:  # its CPU threads, before any torch work (mm_triton.cpu_threads)
            from .cpu_threads import apply_torch_threads

            apply_torch_threads(self.resolver, self.device, self.instance_name)
        heartbeat()  # its file now (idle), before the first execute: a stale one of a reused pid is reset
        self.setup()

    @cached_property
    def transfer_config(self) -> TransferConfig:
        """The transfer knobs (pools, windows, timeouts, transport) of this instance. ``max_embed_tokens`` is
        the per-image budget's (0 = what the image processor allows: resolved from the checkpoint here)."""
        from mmtransfer import TransferConfig

        params = {**self.params, "max_embed_tokens": str(self.image_geometry.max_tokens)}
        env = {k: v for k, v in self.resolver.env.items() if k != "MM_MAX_EMBED_TOKENS"}
        return TransferConfig.from_mapping(params, env)

    @cached_property
    def image_geometry(self) -> ImageGeometry:
        """The checkpoint's image preprocessing under this server's per-image budget (mm_triton.image_budget)."""
        from .image_budget import resolve_image_geometry

        return resolve_image_geometry(self.checkpoint, self.params, self.resolver.env)

    @cached_property
    def checkpoint(self) -> Path | None:
        """The checkpoint directory this instance loads (FileNotFoundError when there is none); None for a
        model that loads no weights (``needs_checkpoint = False``: the pipelines)."""
        return resolve_checkpoint(self.resolver) if self.needs_checkpoint else None

    def setup(self) -> None:
        raise NotImplementedError

    def handle(self, request: Any, request_id: str) -> list[Any]:
        """Return the output tensors for one request; raise to answer with an error."""
        raise NotImplementedError

    @marked
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            try:
                responses.append(self.pb_utils.InferenceResponse(output_tensors=self.handle(request, request_id)))
            except Exception as exc:  # every request gets an answer; the instance keeps serving
                log.warning("%s: request %s failed: %s", self.instance_name, request_id, exc)
                responses.append(self.pb_utils.InferenceResponse(error=self.error_for(exc)))
        return responses

    def finalize(self) -> None:
        """Triton unloads the model. After the outermost ``finalize`` (every class's own is wrapped, see
        ``_closing_heartbeat``) the stub's heartbeat file goes and the model's objects are freed."""

    def error_for(self, exc: BaseException) -> Any:
        """The ``pb_utils.TritonError`` answering a request that raised ``exc`` (see mm_triton.errors)."""
        from .errors import triton_error  # the engine's and the transfer library's errors: torch

        return triton_error(self.pb_utils, exc)

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
        """Integer parameter ``name`` (``MM_<NAME>`` overrides it), ``default`` when unset."""
        return self.resolver.int(name, default)


def _closing_heartbeat(finalize: Any) -> Any:
    """``finalize``, then the stub's heartbeat file is removed (a stub Triton stops runs no exit handler)."""

    @functools.wraps(finalize)
    def run(self: Any) -> None:
        outermost = not vars(self).get("_mm_finalizing", False)  # a subclass's finalize calls super().finalize()
        self._mm_finalizing = True
        try:
            finalize(self)
        finally:
            if outermost:
                close_heartbeat()
                release_objects(self)

    run.__mm_heartbeat__ = True  # type: ignore[attr-defined]
    return run


def release_objects(model: Any) -> None:
    """Free what the model holds now, while its stub is still attached to tritonserver.

    python_backend r24.10 frees a model's objects only after the stub detached; a ``pb_utils`` ``MetricFamily``
    freed then writes to shared memory that is gone (SIGSEGV in ``Metric::SaveToSharedMemory`` under
    ``~MetricFamily``): every unload crashed the stubs, and tritonserver waited out ``--exit-timeout-secs`` for
    models it never saw unloaded (docs/RELIABILITY.md section 6)."""
    vars(model).clear()
    gc.collect()


ModelBase.finalize = _closing_heartbeat(ModelBase.finalize)  # type: ignore[method-assign]
