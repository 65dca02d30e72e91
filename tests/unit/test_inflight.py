"""The pipelines' step monitor (mm_triton.inflight): a request whose step stub died is answered at once, once,
and its slot comes back; without Triton."""

from __future__ import annotations

import subprocess
import sys

from mm_triton.inflight import Answer, StepMonitor
from mm_triton.watchdog import Stub


class FakeError:
    UNAVAILABLE = 14
    CANCELLED = 1

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.error = error


class FakePb:
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    TritonError = FakeError
    InferenceResponse = FakeResponse


class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))


def _stub(pid: int, model: str) -> Stub:
    from mm_triton import procfs

    return Stub(pid, model, f"{model}_0_0", procfs.proc_stat(pid).start_time)


def test_a_dead_step_stub_fails_its_request_once_and_frees_the_slot():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stubs = {proc.pid: _stub(proc.pid, "mm_language")}
        monitor = StepMonitor(FakePb, interval_s=3600, stubs_of=lambda: stubs)
        freed = []
        sender = Sender()
        answer = Answer(FakePb, sender, "r1", on_final=lambda: freed.append(1))
        monitor.enter(answer, "mm_language")
        assert monitor.check_once() == 0 and sender.sent == []
        proc.kill()
        proc.wait()
        assert monitor.check_once() == 1
        ((response, flags),) = sender.sent
        assert flags == 1 and "unavailable (stub_died)" in response.error.message and response.error.code == 14
        answer.send(FakeResponse(), final=True)  # the worker's late answer is dropped
        assert len(sender.sent) == 1 and freed == [1]
        assert monitor.check_once() == 0  # not twice
        monitor.close()
    finally:
        proc.kill()


def test_a_request_on_live_stubs_is_left_alone_and_answered_by_its_worker():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monitor = StepMonitor(FakePb, interval_s=3600, stubs_of=lambda: {proc.pid: _stub(proc.pid, "mm_encoder")})
        freed, sender = [], Sender()
        answer = Answer(FakePb, sender, "r2", on_final=lambda: freed.append(1))
        key = monitor.enter(answer, "mm_language")  # another model's stub: not this request's
        answer.send(FakeResponse(), final=False)
        answer.send(FakeResponse(), final=True)
        monitor.leave(key)
        assert [f for _, f in sender.sent] == [0, 1] and freed == [1] and monitor.check_once() == 0
        monitor.close()
    finally:
        proc.kill()


def test_a_failed_send_counts_as_the_answer():
    class Gone(Sender):
        def send(self, response=None, flags=0):
            raise RuntimeError("client gone")

    freed = []
    answer = Answer(FakePb, Gone(), "r3", on_final=lambda: freed.append(1))
    answer.send(FakeResponse(), final=False)
    assert answer.done and freed == [1]


# ---- the watchdog's stopped-stub and /dev/shm handling --------------------------------------------------------
def test_stopped_stubs_are_seen_and_killed_after_the_grace(tmp_path):
    import os
    import signal
    import time

    from mm_triton.watchdog import StubWatchdog, alive, stopped

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stub = _stub(proc.pid, "mm_encoder")
        assert not stopped(stub)
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not stopped(stub) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stopped(stub)
        dog = StubWatchdog(os.getpid(), "127.0.0.1:1", stop_grace_s=0.2)
        dog._known = {proc.pid: stub}
        dog._kill_stopped()  # first sight: the grace starts
        assert alive(stub)
        time.sleep(0.3)
        dog._kill_stopped()
        proc.wait(5)
        assert proc.returncode == -signal.SIGKILL
    finally:
        proc.kill()


def test_remove_region(tmp_path):
    from mm_triton.watchdog import remove_region

    (tmp_path / "triton_python_backend_shm_region_x").write_bytes(b"\0" * 4096)
    assert remove_region("triton_python_backend_shm_region_x", tmp_path) == 4096
    assert not (tmp_path / "triton_python_backend_shm_region_x").exists()
    assert remove_region("triton_python_backend_shm_region_x", tmp_path) == 0
    assert remove_region("", tmp_path) == 0


def test_a_client_that_gives_up_during_a_step_is_passed_on_once_and_answered_cancelled():
    monitor = StepMonitor(FakePb, interval_s=3600, stubs_of=dict)
    gave_up, posted, freed, sender = [False], [], [], Sender()
    answer = Answer(FakePb, sender, "r3", on_final=lambda: freed.append(1))
    monitor.enter(answer, "mm_language", cancelled=lambda: gave_up[0], on_cancel=lambda: posted.append("key"))
    assert monitor.check_once() == 0 and posted == [] and sender.sent == []
    gave_up[0] = True
    assert monitor.check_once() == 1
    ((response, flags),) = sender.sent
    assert flags == 1 and response.error.code == FakeError.CANCELLED and "r3 was cancelled" in response.error.message
    assert posted == ["key"] and freed == [1]
    assert monitor.check_once() == 0 and posted == ["key"]  # once
    answer.send(FakeResponse(), final=True)  # the step's late answer is dropped
    assert len(sender.sent) == 1
    monitor.close()


def test_the_client_is_never_asked_once_its_request_is_answered():
    """is_cancelled() on an answered request crashes tritonserver 2.51 (its response factory is freed)."""
    asked, sender = [], Sender()
    answer = Answer(FakePb, sender, "r4")

    def probe():
        asked.append(1)
        return False

    assert answer.client_cancelled(probe) is False and asked == [1]
    answer.send(FakeResponse(), final=True)
    assert answer.client_cancelled(probe) is False and asked == [1]
    monitor = StepMonitor(FakePb, interval_s=3600, stubs_of=dict)
    monitor.enter(answer, "mm_language", cancelled=probe, on_cancel=lambda: asked.append("posted"))
    assert monitor.check_once() == 0 and asked == [1]
    monitor.close()
