"""mm_pipeline_stream's relay reads the language stream to its end on its own thread, on every path.

python_backend r24.10 destroys a ResponseIterator dropped before its end on the stub's service thread, which
frees the buffered responses' tensors without the GIL: SIGSEGV in ~PbTensor under Stub::SendCleanupId (cores
from one H200 and the CPU VM, docs/RELIABILITY.md section 6). These tests fail if any exit leaves the stream
unread."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mm_triton.bls import LateRelease, drain_stream
from mm_triton.inflight import Answer
from mm_triton.pipeline import PipelineModel


class _Reply:
    def __init__(self, outputs: dict[str, object], error: str | None = None) -> None:
        self.outputs, self.error_text = outputs, error

    def has_error(self) -> bool:
        return self.error_text is not None

    def error(self):
        return SimpleNamespace(message=lambda: self.error_text, code=lambda: None)

    def output_tensors(self) -> list:
        return list(self.outputs.values())


class _Stream:
    """A BLS response stream that counts what was read (exhausted: everything was)."""

    def __init__(self, replies: list[_Reply], fail_after: int | None = None) -> None:
        self.replies, self.read, self.fail_after = replies, 0, fail_after

    def __iter__(self):
        return self

    def __next__(self) -> _Reply:
        if self.fail_after is not None and self.read >= self.fail_after:
            raise RuntimeError("stub went away")
        if self.read >= len(self.replies):
            raise StopIteration
        self.read += 1
        return self.replies[self.read - 1]

    @property
    def exhausted(self) -> bool:
        return self.read == len(self.replies)


class _Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []

    def send(self, response=None, flags: int = 0) -> None:
        self.sent.append((response, flags))


class _TritonError:
    INTERNAL = 13

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


_FINAL = 1
_PB = SimpleNamespace(
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=_FINAL,
    InferenceResponse=lambda output_tensors=(), error=None: SimpleNamespace(tensors=output_tensors, error=error),
    TritonError=_TritonError,
    get_output_tensor_by_name=lambda reply, name: reply.outputs.get(name),
)


def _relay(replies: list[_Reply], *, done_before: bool = False) -> tuple[_Stream, _Sender]:
    model = PipelineModel.__new__(PipelineModel)  # no initialize(): only what _relay_stream uses
    model.pb_utils, model.language_model = _PB, "mm_language_stream"
    model._monitor = SimpleNamespace(enter=lambda *a, **k: "key", leave=lambda key: None)
    model._finished_streams = LateRelease(delay_s=60)
    stream, sender = _Stream(replies), _Sender()
    answer = Answer(_PB, sender, "r1")
    answer.done = done_before
    model._relay_stream(SimpleNamespace(exec=lambda decoupled: stream), answer, {})
    assert len(model._finished_streams) == 1  # kept past the stub's own cleanup of it
    return stream, sender


def _tokens(n: int) -> _Reply:
    return _Reply({"TEXT": f"t{n}"})


def test_a_final_data_response_is_relayed_final_and_the_stream_still_read_to_its_end():
    # the language stream's last data response carries FINISH_REASON; anything behind it is read, not dropped
    stream, sender = _relay([_tokens(0), _tokens(1), _Reply({"TEXT": "t2", "FINISH_REASON": "length"}), _Reply({})])
    assert stream.exhausted
    assert [flags for _, flags in sender.sent] == [0, 0, _FINAL]


def test_an_answer_already_given_still_reads_the_stream_to_its_end():
    stream, sender = _relay([_tokens(0), _tokens(1), _tokens(2)], done_before=True)
    assert stream.exhausted and sender.sent == []


@pytest.mark.parametrize("bad", ["error", "inband"])
def test_an_error_on_the_stream_still_reads_it_to_its_end(bad):
    inband = SimpleNamespace(as_numpy=lambda: np.array([b"INTERNAL\tboom"], dtype=object))
    failing = _Reply({}, error="boom") if bad == "error" else _Reply({"MM_ERROR": inband})
    stream, sender = _relay([_tokens(0), failing, _tokens(2)])
    assert stream.exhausted
    assert sender.sent[-1][1] == _FINAL and len(sender.sent) == 2


def test_drain_stream_swallows_a_stream_that_breaks():
    stream = _Stream([_tokens(0), _tokens(1)], fail_after=1)
    drain_stream(stream, "r1")  # must not raise: the request is answered already
    assert stream.read == 1
    ok = _Stream([_tokens(0), _tokens(1)])
    drain_stream(ok, "r1")
    assert ok.exhausted


def test_late_release_drops_what_it_keeps_after_the_delay_on_its_own_thread():
    import threading
    import time
    import weakref

    class _Kept:
        pass

    dropped_on: list[str] = []
    late = LateRelease(delay_s=1.5)  # long enough that a loaded CI machine still sees it held below
    obj = _Kept()
    ref = weakref.ref(obj, lambda _: dropped_on.append(threading.current_thread().name))
    late.keep(obj)
    del obj
    assert ref() is not None and len(late) == 1  # held
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ref() is None and len(late) == 0
    assert dropped_on == ["mm-late-release"]


def test_late_release_close_drops_everything_after_the_newest_delay():
    import time
    import weakref

    class _Kept:
        pass

    late = LateRelease(delay_s=0.3)
    objs = [_Kept(), _Kept()]
    refs = [weakref.ref(o) for o in objs]
    t0 = time.monotonic()
    for o in objs:
        late.keep(o)
    del objs, o
    late.close()  # the model's finalize: nothing may be left for the interpreter's exit
    assert 0.25 <= time.monotonic() - t0 < 5.0  # waited for the newest one's delay, no longer
    assert len(late) == 0 and all(r() is None for r in refs)
