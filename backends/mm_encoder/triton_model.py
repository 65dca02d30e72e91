"""Triton model ``mm_encoder``: IMAGE (BYTES [-1]) -> EMBED_REF (BYTES [-1])."""
from __future__ import annotations

from typing import Any

import numpy as np

from mm_triton.access import InternalGate, register_endpoint
from mm_triton.image_budget import ResizedImagesCounter
from mm_triton.metrics import TritonMetrics
from mmtransfer import RequestTooLarge, TransferError
from mm_triton.model_base import ModelBase
from mm_triton.params import instance_index
from mm_triton.tensors import bytes_list

from .service import DEFAULT_MAX_IMAGE_PIXELS, EncoderService


class EncoderModel(ModelBase):
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
        self.service = EncoderService(
            self.checkpoint, config, self.device, name=self.instance_name,
            max_image_pixels=self.int_param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            encode_threads=self.int_param("encode_threads", 0),
            cache_blocks=self.int_param("cache_blocks", 0),
            geometry=self.image_geometry, on_downscaled=self._resized,
        )
        self.metrics = TritonMetrics(self.pb_utils, self.model_name, self.instance_name, self.service.pool,
                                     cache=self.service.cache)
        self.service.sender.observer = self.metrics
        mf = self.pb_utils.MetricFamily
        self._images_family = mf(name="mm_images_encoded_total", description="Images encoded and published",
                                 kind=mf.COUNTER)
        self._images = self._images_family.Metric(labels={"model": self.model_name, "instance": self.instance_name})
        self.gate = InternalGate.for_model(self.model_name, self.params, self.transfer_config.shared_secret)
        register_endpoint(self.service.sender.address)  # mm_language of this server trusts it (mm_language.trust)

    def handle(self, request: Any, request_id: str) -> list[Any]:
        self.gate.check(self.pb_utils, request)  # before anything is read or allocated
        try:
            refs = self.service.encode(bytes_list(self.pb_utils, request, "IMAGE"), request_id,
                                       self.cancellation_check(request))
        except TransferError as exc:  # pool exhausted, cancelled: counted like the receiver's failures
            if not isinstance(exc, RequestTooLarge):
                self.metrics.transfer_failed(exc.cause)
            raise
        self._images.increment(len(refs))
        payload = np.array([ref.to_json().encode() for ref in refs], dtype=np.object_)
        return [self.pb_utils.Tensor("EMBED_REF", payload)]

    def finalize(self) -> None:
        self.service.close()
