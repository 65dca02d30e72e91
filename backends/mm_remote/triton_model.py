"""Triton model ``mm_pipeline`` of a language server (BLS): the same contract as the ensemble.

    IMAGE (BYTES [n]), PROMPT (BYTES [1]), MAX_TOKENS (INT32 [1], optional) -> TEXT (BYTES [1]), TOKEN_IDS (INT64 [-1])

1. IMAGE goes to ``mm_encoder`` on a remote encoder server (gRPC, ``encoder_urls`` round-robin);
   EMBED_REFs come back (small handles; each embedding stays in that encoder instance's pool).
2. EMBED_REF, PROMPT, MAX_TOKENS go to the local ``mm_language`` by BLS; its instance pulls every
   embedding from the encoder instance named in the EMBED_REF (pull protocol, control channel) and
   generates. Its outputs, or its error, are this model's.

Parameters (``MM_<NAME>`` environment variables override them, as for the other models):
``encoder_urls`` (comma-separated HOST:PORT gRPC addresses of encoder servers), ``encoder_model``
(``mm_encoder``), ``encoder_timeout_s`` (300), ``language_model`` (``mm_language``).

No torch here: an instance of this model only waits on the encoder server and on ``mm_language``,
so it is cheap to run several (each one carries one request at a time).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mm_triton.access import derive_token, register_endpoint, server_token, token_tensor
from mm_triton.bls import code_name as _code_name
from mm_triton.bounds import RequestBounds, check_request
from mm_triton.model_base import ModelBase
from mm_triton.params import instance_index

from .encoders import DEFAULT_ENCODER_MODEL, DEFAULT_TIMEOUT_S, EncoderCallError, RemoteEncoders

log = logging.getLogger(__name__)
OUTPUTS = ("TEXT", "TOKEN_IDS")


def _ref_address(raw: bytes) -> str | None:
    """The ``address`` of an EMBED_REF's JSON (no mmtransfer import here: it would load torch)."""
    try:
        address = json.loads(raw).get("address")
    except (ValueError, AttributeError):
        return None
    return address if isinstance(address, str) and address.startswith("tcp://") and len(address) <= 300 else None


class _StepError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemotePipelineModel(ModelBase):
    """No checkpoint, no transfer pool: only the parameters, the remote encoders and the BLS call."""

    def setup(self) -> None:
        knobs = self.resolver
        self.language_model = knobs.str("language_model", "mm_language")
        timeout_s = knobs.float("encoder_timeout_s", DEFAULT_TIMEOUT_S, low=0.0)
        self.bounds = RequestBounds.from_params(self.int_param)
        # the local mm_language takes this server's token; a remote encoder server knows only the shared
        # secret's (it is open when none is set: internal_access=shared_secret, docs/RELIABILITY.md)
        shared = knobs.str("shared_secret", "")
        self._token = server_token()
        remote_token = derive_token(shared) if shared else ""
        self._families: list[Any] = []
        self._counters: dict[tuple[str, str], Any] = {}
        index = instance_index(self.model_config, self.instance_name)
        self.encoders = RemoteEncoders(
            knobs.str("encoder_urls", ""),
            knobs.str("encoder_model", DEFAULT_ENCODER_MODEL),
            timeout_s,
            start=index,
            observer=self._count,
            token=remote_token,
        )
        self._setup_metrics()
        for url, problem in self.encoders.check().items():
            if problem:
                log.warning(
                    "%s: encoder server %s: %s (requests get UNAVAILABLE until it is up)",
                    self.instance_name,
                    url,
                    problem,
                )
        log.info(
            "%s: encoder server(s) %s (model %s, timeout %g s), language model %s",
            self.instance_name,
            ", ".join(self.encoders.urls),
            self.encoders.model,
            timeout_s,
            self.language_model,
        )

    def _setup_metrics(self) -> None:
        mf = self.pb_utils.MetricFamily
        family = mf(
            name="mm_remote_encoder_requests_total",
            description="Requests sent to remote encoder servers, by server and outcome",
            kind=mf.COUNTER,
        )
        self._families.append(family)
        for url in self.encoders.urls:
            for outcome in ("ok", "unavailable", "error"):
                self._counters[(url, outcome)] = family.Metric(
                    labels={
                        "model": self.model_name,
                        "instance": self.instance_name,
                        "encoder": url,
                        "outcome": outcome,
                    }
                )

    def _count(self, url: str, outcome: str) -> None:
        counter = self._counters.get((url, outcome))
        if counter is not None:
            counter.increment(1)

    def error_for(self, exc: BaseException) -> Any:
        """mm_language's own code for its errors (forwarded), INVALID_ARG for bad input, else INTERNAL."""
        if isinstance(exc, (EncoderCallError, _StepError)):
            return self._error(exc.code, str(exc))
        if isinstance(exc, ValueError):
            return self._error("INVALID_ARG", f"invalid input: {exc}")
        log.error("%s: internal error", self.instance_name, exc_info=exc)
        return self._error("INTERNAL", f"internal error ({type(exc).__name__}): {exc}")

    def handle(self, request: Any, request_id: str) -> list[Any]:
        pb = self.pb_utils
        check_request(pb, request, self.bounds, ("IMAGE", "PROMPT", "MAX_TOKENS"))
        images = pb.get_input_tensor_by_name(request, "IMAGE")
        prompt = pb.get_input_tensor_by_name(request, "PROMPT")
        max_tokens = pb.get_input_tensor_by_name(request, "MAX_TOKENS")
        image_array = images.as_numpy().reshape(-1)
        if image_array.size == 0:
            raise ValueError("IMAGE: at least one image is required")
        refs, _url = self.encoders.encode(image_array, request_id)
        for raw in refs:  # endpoints an --encoder-url server advertised: this server's mm_language trusts them
            address = _ref_address(raw)
            if address:  # a malformed ref is refused by mm_language with its own message
                register_endpoint(address)
        inputs = [pb.Tensor("EMBED_REF", refs), prompt, token_tensor(pb, self._token)]
        inputs += [max_tokens] if max_tokens is not None else []
        language_request = pb.InferenceRequest(
            model_name=self.language_model, inputs=inputs, requested_output_names=list(OUTPUTS), request_id=request_id
        )
        response = language_request.exec()
        if response.has_error():
            error = response.error()
            raise _StepError(_code_name(pb, error, error.message()), error.message())
        return [pb.get_output_tensor_by_name(response, name) for name in OUTPUTS]

    def _error(self, code: str, message: str) -> Any:
        err_cls = self.pb_utils.TritonError
        value = getattr(err_cls, code, None)
        return err_cls(message, value) if value is not None else err_cls(message)

    def finalize(self) -> None:
        self.encoders.close()
