"""The Triton side of the engine without a server: generation inputs at the boundary, the two sinks (one answer,
one answer per token), engine error codes, and execute() answering refusals at once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mm_engine.api import EngineError, ErrorCause, FinishReason, GenerationOutput
from mm_triton.errors import error_code_name, triton_error
from mm_triton.generation_inputs import InputLimits, read_generation_inputs
from mm_triton.sinks import StreamSink, UnarySink
from mmtransfer import TransferNotFound


# ---- a minimal stand-in for triton_python_backend_utils -----------------------------------------------------
class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class _Error(Exception):
    INVALID_ARG, UNAVAILABLE, CANCELLED, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message, self.code = message, code


class _Sender:
    def __init__(self, fail=False):
        self.sent, self.fail = [], fail

    def send(self, response, flags=0):
        if self.fail:
            raise RuntimeError("stream closed")
        self.sent.append((response, flags))


class _Request:
    def __init__(self, inputs, fail=False):
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items()}
        self.sender = _Sender(fail)

    def get_response_sender(self):
        return self.sender

    def request_id(self):
        return "rid"


pb = SimpleNamespace(
    Tensor=_Tensor,
    InferenceResponse=_Response,
    TritonError=_Error,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
    get_input_tensor_by_name=lambda request, name: request.inputs.get(name),
)


def _prompt(text=b"Describe"):
    return {"PROMPT": np.array([text], dtype=np.object_)}


# ---- generation inputs ---------------------------------------------------------------------------------------
def test_generation_inputs_defaults_and_values():
    limits = InputLimits(max_tokens_limit=64, default_max_tokens=8)
    got = read_generation_inputs(pb, _Request(_prompt()), limits, arrived=100.0)
    assert got.prompt == "Describe" and got.deadline is None
    assert (
        got.sampling.max_tokens,
        got.sampling.temperature,
        got.sampling.top_p,
        got.sampling.top_k,
        got.sampling.seed,
        got.sampling.stop,
        got.sampling.ignore_eos,
    ) == (8, 0.0, 1.0, 0, None, (), False)
    inputs = {
        **_prompt(),
        "MAX_TOKENS": np.array([5], np.int32),
        "TEMPERATURE": np.array([0.7], np.float32),
        "TOP_P": np.array([0.9], np.float32),
        "TOP_K": np.array([40], np.int32),
        "SEED": np.array([2**40], np.int64),
        "STOP": np.array([b"\n\n", "é".encode()], dtype=np.object_),
        "TIMEOUT_MS": np.array([250], np.int32),
        "IGNORE_EOS": np.array([True]),
    }
    got = read_generation_inputs(pb, _Request(inputs), limits, arrived=100.0)
    s = got.sampling
    assert (s.max_tokens, s.top_k, s.seed, s.stop, s.ignore_eos) == (5, 40, 2**40, ("\n\n", "é"), True)
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9)
    assert got.deadline == pytest.approx(100.25)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"PROMPT": np.array([b"  "], dtype=np.object_)}, "PROMPT: must not be empty"),
        ({"PROMPT": np.array([b"a <|image_pad|>"], dtype=np.object_)}, "PROMPT: .*reserved vision token"),
        ({"MAX_TOKENS": np.array([0], np.int32)}, r"MAX_TOKENS: must be in \[1, 64\]"),
        ({"MAX_TOKENS": np.array([65], np.int32)}, r"MAX_TOKENS: must be in \[1, 64\]"),
        ({"TEMPERATURE": np.array([2.5], np.float32)}, r"TEMPERATURE: must be in \[0, 2\]"),
        ({"TEMPERATURE": np.array([np.nan], np.float32)}, "TEMPERATURE must be a finite number"),
        ({"TOP_P": np.array([0.0], np.float32)}, r"TOP_P: must be in \(0, 1\]"),
        ({"TOP_K": np.array([-1], np.int32)}, "TOP_K: must be in"),
        ({"SEED": np.array([-5], np.int64)}, "SEED: must be in"),
        ({"STOP": np.array([b"a", b"b", b"c", b"d", b"e"], dtype=np.object_)}, "STOP: at most 4"),
        ({"STOP": np.array([b""], dtype=np.object_)}, r"STOP\[0\]: must be 1..256 bytes"),
        ({"STOP": np.array([b"\xff"], dtype=np.object_)}, r"STOP\[0\] is not valid UTF-8"),
        ({"TIMEOUT_MS": np.array([0], np.int32)}, "TIMEOUT_MS: must be in"),
        ({"TOP_K": np.array([1.5], np.float32)}, "TOP_K must be one integer"),
        ({"IGNORE_EOS": np.array([1], np.int32)}, "IGNORE_EOS must be one boolean"),
    ],
)
def test_generation_inputs_name_the_bad_input(extra, message):
    with pytest.raises(ValueError, match=message):
        read_generation_inputs(pb, _Request({**_prompt(), **extra}), InputLimits(max_tokens_limit=64))


# ---- sinks ---------------------------------------------------------------------------------------------------
def _output(ids=(5, 6, 7), text="abc", reason=FinishReason.LENGTH):
    return GenerationOutput("rid", list(ids), text, reason, prompt_tokens=40, completion_tokens=len(ids))


def test_unary_sink_answers_once_with_everything():
    request = _Request(_prompt())
    sink = UnarySink(pb, request, "rid", lambda: False)
    sink.on_tokens([5], "a")
    sink.on_tokens([6, 7], "bc")
    assert request.sender.sent == []  # nothing before the end
    sink.on_finish(_output())
    sink.on_error(EngineError(ErrorCause.INTERNAL, "late"))  # after the final call: ignored
    assert len(request.sender.sent) == 1
    response, flags = request.sender.sent[0]
    assert flags == 1 and response.error is None
    out = response.outputs
    assert out["TEXT"][0] == b"abc" and out["TOKEN_IDS"].tolist() == [5, 6, 7]
    assert out["FINISH_REASON"][0] == b"length" and out["PROMPT_TOKENS"].tolist() == [40]
    assert out["COMPLETION_TOKENS"].dtype == np.int32 and out["COMPLETION_TOKENS"].tolist() == [3]


def test_stream_sink_sends_each_delta_and_final_on_the_last_data_response():
    request = _Request(_prompt())
    sink = StreamSink(pb, request, "rid", lambda: False)
    sink.on_tokens([5], "a")
    sink.on_tokens([6], "")  # a character still pending in the detokenizer
    sink.on_finish(_output(ids=(5, 6, 7), text="ab!", reason=FinishReason.STOP))
    sent = request.sender.sent
    assert [flags for _, flags in sent] == [0, 0, 1]
    assert [r.outputs["TOKEN_IDS"].tolist() for r, _ in sent] == [[5], [6], [7]]
    assert b"".join(r.outputs["TEXT"][0] for r, _ in sent) == b"ab!"
    final = sent[-1][0].outputs
    assert final["FINISH_REASON"][0] == b"stop" and "FINISH_REASON" not in sent[0][0].outputs


def test_stream_sink_error_is_final_and_a_failed_send_cancels():
    request = _Request(_prompt())
    sink = StreamSink(pb, request, "rid", lambda: False)
    sink.on_tokens([5], "a")
    sink.on_error(EngineError(ErrorCause.DEADLINE, "request rid passed its deadline"))
    response, flags = request.sender.sent[-1]
    assert flags == 1 and response.error.code == "UNAVAILABLE"
    assert response.error.message.startswith("unavailable (deadline)")
    gone = _Request(_prompt(), fail=True)
    sink = StreamSink(pb, gone, "rid", lambda: False)
    assert not sink.cancelled()
    sink.on_tokens([5], "a")  # the client went away: never raises, and the engine sees a cancellation
    assert sink.cancelled()
    probe = {"v": False}
    sink = UnarySink(pb, _Request(_prompt()), "rid", lambda: probe["v"])
    probe["v"] = True
    assert sink.cancelled()


def test_a_sink_never_asks_the_client_once_it_answered():
    """is_cancelled() after the FINAL answer crashes tritonserver 2.51 (the response factory is freed); a loader
    thread may still probe then."""
    asked = []
    sink = UnarySink(pb, _Request(_prompt()), "rid", lambda: asked.append(1) or False)
    assert not sink.cancelled() and asked == [1]
    sink.on_finish(_output())
    assert sink.cancelled() and asked == [1]


# ---- engine error codes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cause, code, prefix",
    [
        (ErrorCause.INVALID, "INVALID_ARG", "invalid input"),
        (ErrorCause.QUEUE_FULL, "UNAVAILABLE", "unavailable (queue_full)"),
        (ErrorCause.QUEUE_TIMEOUT, "UNAVAILABLE", "unavailable (queue_timeout)"),
        (ErrorCause.DEADLINE, "UNAVAILABLE", "unavailable (deadline)"),
        (ErrorCause.SHUTDOWN, "UNAVAILABLE", "unavailable (shutdown)"),
        (ErrorCause.CANCELLED, "CANCELLED", "cancelled"),
        (ErrorCause.INTERNAL, "INTERNAL", "internal error (internal)"),
    ],
)
def test_engine_error_codes(cause, code, prefix):
    assert error_code_name(EngineError(cause, "x")) == (code, prefix)


def test_image_load_errors_take_the_loaders_code_and_message():
    err = EngineError(ErrorCause.IMAGE_LOAD, "loading failed")
    err.__cause__ = TransferNotFound("unknown transfer id abc")
    assert error_code_name(err) == ("UNAVAILABLE", "unavailable (not_found)")
    assert triton_error(pb, err).message == "unavailable (not_found): unknown transfer id abc"


# ---- execute(): refusals are answered at once, their embeddings freed ----------------------------------------
def test_execute_answers_a_refused_request_and_abandons_it():
    from mm_triton.engine_model import EngineModel

    class Full:
        def submit(self, request, sink):
            raise EngineError(ErrorCause.QUEUE_FULL, "64 sequences are waiting (max_queue_size=64)")

    abandoned = []

    class Model(EngineModel):
        pb_utils = pb

        def build_request(self, request, request_id, arrived):
            if "PROMPT" not in request.inputs:
                raise ValueError("input PROMPT is required")
            return SimpleNamespace(cancelled=None)

        def abandon(self, request, reason):
            abandoned.append(reason)

    model = Model()
    model.decoupled, model.instance_name, model.engine = False, "m_0", Full()
    counted = []
    model.engine_metrics = SimpleNamespace(on_finished=counted.append)
    full, bad = _Request(_prompt()), _Request({})
    assert model.execute([full, bad]) is None
    (r1, f1), (r2, f2) = full.sender.sent[0], bad.sender.sent[0]
    assert f1 == f2 == 1
    assert r1.error.code == "UNAVAILABLE" and "queue_full" in r1.error.message
    assert r2.error.code == "INVALID_ARG" and "PROMPT is required" in r2.error.message
    assert len(abandoned) == 2 and counted == ["queue_full", "invalid"]


def test_engine_metrics_follow_the_engines_hooks():
    from mm_triton.engine_metrics import EngineMetrics

    class Metric:
        def __init__(self, labels, buckets=None):
            self.labels, self.value, self.observed = labels, 0, []

        def increment(self, n):
            self.value += n

        def set(self, v):
            self.value = v

        def observe(self, v):
            self.observed.append(v)

    class Family:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
        made: dict = {}

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' spelling
            m = Metric(labels, buckets)
            Family.made[(self.name, labels.get("outcome"))] = m
            return m

    m = EngineMetrics(SimpleNamespace(MetricFamily=Family), "mm_language", "mm_language_0")
    m.on_gauges(3, 2, 3, 16)
    m.on_prompt_tokens(100)
    m.on_generation_tokens(3)
    m.on_time_to_first_token(0.05)
    m.on_inter_token_latency(0.01)
    m.on_finished("length")
    m.on_finished("queue_full")
    m.on_finished("no-such-outcome")  # logged, never raises
    made = Family.made
    assert made[("mm_engine_running_sequences", None)].value == 3
    assert made[("mm_engine_kv_slots_total", None)].value == 16
    assert made[("mm_engine_prompt_tokens_total", None)].value == 100
    assert made[("mm_engine_ttft_seconds", None)].observed == [0.05]
    assert made[("mm_engine_requests_total", "queue_full")].value == 1
    assert made[("mm_engine_requests_total", "length")].value == 1
