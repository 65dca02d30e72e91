"""Triton model ``mm_encoder``: IMAGE (BYTES [-1]) -> EMBED_REF (BYTES [-1]).

``execute()`` decodes, checks and preprocesses each request's images, queues them for the encode batcher and
returns None; the batcher thread answers each request (one FINAL response) through its response sender, so
the next request is prepared while one is in the vision tower, and concurrent requests' images share a
tower call (Triton 2.51 lets a non-decoupled Python model answer this way, ENVIRONMENT.md).

``max_encode_batch_tokens`` 0 turns that off: ``execute()`` encodes its own requests and returns their
responses (one request per tower call). That path handles a SIGKILLed stub as before: with answers sent from
a thread, Triton 2.51 never fails the requests in flight in the killed stub (they wait for their deadline, as
with mm_language), and in 2 of 4 runs tritonserver itself aborted (``boost::interprocess::lock_exception`` at
the reload, heap corruption at shutdown; tests/integration/test_faults.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any

import numpy as np

from mm_triton.access import InternalGate, register_endpoint
from mm_triton.errors import triton_error
from mm_triton.image_budget import ResizedImagesCounter
from mm_triton.metrics import TritonMetrics
from mm_triton.model_base import ModelBase
from mm_triton.params import instance_index
from mm_triton.phases import Phase, PhaseClock, PhaseMetrics
from mm_triton.tensors import bytes_list
from mmtransfer import EmbedRef, RequestTooLarge, TransferError

from .batcher import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_DELAY_MS
from .service import DEFAULT_MAX_IMAGE_PIXELS, EncoderService

log = logging.getLogger(__name__)
PHASES = (Phase.QUEUE, Phase.IMAGE_DECODE, Phase.PREPROCESS, Phase.VISION, Phase.PUBLISH, Phase.RESPONSE)


class EncoderModel(ModelBase):
    uses_torch = True  # torch_threads (mm_triton.cpu_threads)

    def setup(self) -> None:
        self._resized = ResizedImagesCounter(self.pb_utils, self.model_name, self.instance_name)
        config = self.transfer_config
        if config.control_port:
            # A fixed control port is the first instance's; instance i binds control_port + i, so the
            # ports to open in a firewall are a known range (docs/DEPLOYMENT.md).
            device_id = int(self.device.split(":")[1]) if self.device.startswith("cuda:") else None
            index = instance_index(self.model_config, self.instance_name, device_id)
            if config.control_port + index > 65535:
                raise ValueError(f"control_port {config.control_port} + instance index {index} is not a port")
            config = config.replace(control_port=config.control_port + index)
        self.batching = self.int_param("max_encode_batch_tokens", DEFAULT_MAX_BATCH_TOKENS) > 0
        self.service = EncoderService(
            self.checkpoint,
            config,
            self.device,
            name=self.instance_name,
            max_image_pixels=self.int_param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            encode_threads=self.int_param("encode_threads", 0),
            cache_blocks=self.int_param("cache_blocks", 0),
            geometry=self.image_geometry,
            on_downscaled=self._resized,
            max_encode_batch_tokens=self.int_param("max_encode_batch_tokens", DEFAULT_MAX_BATCH_TOKENS) or 1,
            max_encode_delay_ms=self.int_param("max_encode_delay_ms", DEFAULT_MAX_DELAY_MS),
        )
        self.metrics = TritonMetrics(
            self.pb_utils, self.model_name, self.instance_name, self.service.pool, cache=self.service.cache
        )
        self.phases = PhaseMetrics(self.pb_utils, self.model_name, self.instance_name, PHASES)
        self.service.sender.observer = self.metrics
        mf = self.pb_utils.MetricFamily
        self._images_family = mf(
            name="mm_images_encoded_total", description="Images encoded and published", kind=mf.COUNTER
        )
        self._images = self._images_family.Metric(labels={"model": self.model_name, "instance": self.instance_name})
        self.gate = InternalGate.for_model(self.model_name, self.params, self.transfer_config.shared_secret)
        register_endpoint(self.service.sender.address)  # mm_language of this server trusts it (mm_language.trust)
        self._batch_family = mf(
            name="mm_encode_batch_images", description="Images per vision tower call", kind=mf.HISTOGRAM
        )
        batch = self._batch_family.Metric(
            labels={"model": self.model_name, "instance": self.instance_name}, buckets=[1, 2, 4, 8, 16, 32, 64]
        )
        self.service.runner.on_tower_call = batch.observe

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if not self.batching:
            return self._execute_unbatched(requests)
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            sender = request.get_response_sender()
            done = self._answerer(sender, request_id)
            try:
                self._admit(request)
                self.service.submit(
                    bytes_list(self.pb_utils, request, "IMAGE"), done, request_id, self.cancellation_check(request)
                )
            except Exception as exc:  # refused before anything was queued or held: answer at once
                done(None, exc, PhaseClock())
        return None

    def _execute_unbatched(self, requests: list[Any]) -> list[Any]:
        """Answer from execute() itself: each request waits for its own tower call (no batching)."""
        responses = []
        for request in requests:
            request_id = request.request_id() or uuid.uuid4().hex[:12]
            out: list[Any] = []
            ready = threading.Event()
            answer = self._answerer(
                SimpleNamespace(send=lambda response, flags=0, _out=out: _out.append(response)), request_id
            )

            def done(refs, error, clock, _answer=answer, _ready=ready) -> None:
                try:
                    _answer(refs, error, clock)
                finally:
                    _ready.set()

            try:
                self._admit(request)
                self.service.submit(
                    bytes_list(self.pb_utils, request, "IMAGE"), done, request_id, self.cancellation_check(request)
                )
            except Exception as exc:  # refused before anything was queued or held
                done(None, exc, PhaseClock())
            ready.wait()  # the batcher thread encodes this request alone (nothing else is queued meanwhile)
            responses.append(
                out[0]
                if out
                else self.pb_utils.InferenceResponse(
                    error=triton_error(self.pb_utils, RuntimeError("the encoder could not build its answer"))
                )
            )
        return responses

    def _admit(self, request: Any) -> None:
        """Refuse a request before anything is read or allocated: the access gate, where the model has one
        (``self.gate``, an ``InternalGate`` with ``check(pb_utils, request)``)."""
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.check(self.pb_utils, request)

    def _answerer(self, sender: Any, request_id: str):
        """The request's ``done(refs, error, clock)``: one FINAL response, its metrics and phases."""

        def done(refs: list[EmbedRef] | None, error: BaseException | None, clock: PhaseClock) -> None:
            started = time.perf_counter()
            try:
                if error is not None:
                    log.warning("%s: request %s failed: %s", self.instance_name, request_id, error)
                    if isinstance(error, TransferError) and not isinstance(error, RequestTooLarge):
                        self.metrics.transfer_failed(error.cause)  # pool exhausted, cancelled
                    response = self.pb_utils.InferenceResponse(error=triton_error(self.pb_utils, error))
                else:
                    self._images.increment(len(refs or []))
                    payload = np.array([ref.to_json().encode() for ref in refs or []], dtype=np.object_)
                    response = self.pb_utils.InferenceResponse(
                        output_tensors=[self.pb_utils.Tensor("EMBED_REF", payload)]
                    )
                sender.send(response, flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # noqa: BLE001 - the client went away: nobody will pull its embeddings
                log.exception("%s: request %s could not be answered", self.instance_name, request_id)
                for ref in refs or []:
                    self.service.sender.discard(ref.transfer_id, "the answer was not delivered")
                return
            if error is None:
                clock.add(Phase.RESPONSE, time.perf_counter() - started)
                self.phases.observe(request_id, clock.seconds)

        return done

    def finalize(self) -> None:
        self.service.close()
