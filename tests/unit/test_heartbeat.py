"""Hang detection (issue 14): every model's execute() marks the stub's heartbeat, and the watchdog kills a stub
busy in one call longer than hang_s (it is then reloaded like a dead one)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from mm_triton import heartbeat, procfs
from mm_triton.model_base import ModelBase
from mm_triton.watchdog import Stub, StubWatchdog


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setattr(heartbeat, "SHM_DIR", tmp_path)
    monkeypatch.setattr(heartbeat, "_beats", {})
    return tmp_path


class _Model(ModelBase):
    model_name = "mm_probe"

    def __init__(self, seen):
        self.seen = seen

    def execute(self, requests):
        self.seen.append(heartbeat.busy_since(os.getpid()))
        return super().execute(requests)  # nested: marked once

    def handle(self, request, request_id):
        self.seen.append(heartbeat.busy_since(os.getpid()))
        return []


def test_execute_marks_the_heartbeat_while_it_runs(shm):
    seen: list[float] = []
    model = _Model(seen)
    model.pb_utils = type("PB", (), {"InferenceResponse": staticmethod(lambda **kw: kw)})
    request = type("R", (), {"request_id": lambda self: "r1"})()
    before = time.monotonic()
    model.execute([request])
    assert len(seen) == 2 and seen[0] == seen[1] and before <= seen[0] <= time.monotonic()
    assert heartbeat.busy_since(os.getpid()) == 0.0  # idle again
    assert heartbeat.path_for(os.getpid()).parent == shm


def test_the_test_only_knob_hangs_the_named_model_until_its_file_goes(shm, monkeypatch):
    flag = shm / "hang"
    flag.write_text("mm_probe")
    monkeypatch.setenv("MM_TEST_HANG_FILE", str(flag))
    model = _Model([])
    model.pb_utils = type("PB", (), {"InferenceResponse": staticmethod(lambda **kw: kw)})
    done = threading.Event()
    worker = threading.Thread(target=lambda: (model.execute([]), done.set()), daemon=True)
    worker.start()
    time.sleep(0.3)
    assert not done.is_set() and heartbeat.busy_since(os.getpid()) > 0
    flag.unlink()
    assert done.wait(2)
    flag.write_text("mm_other")  # another model's name: no hang
    model.execute([])


def _child_busy_for(shm, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = heartbeat.path_for(child.pid)
    path.write_bytes(__import__("struct").pack("<d", time.monotonic() - seconds if seconds else 0.0))
    return child


@pytest.mark.parametrize(
    "model, busy_s, killed",
    [("mm_encoder", 10.0, True), ("mm_encoder", 1.0, False), ("mm_encoder", 0.0, False), ("mm_control", 10.0, False)],
)
def test_the_watchdog_kills_a_stub_busy_in_one_execute_past_hang_s(shm, model, busy_s, killed):
    child = _child_busy_for(shm, busy_s)
    try:
        stat = procfs.proc_stat(child.pid)
        dog = StubWatchdog(os.getpid(), "127.0.0.1:1", hang_s=5.0)
        dog._known = {child.pid: Stub(child.pid, model, f"{model}_0", stat.start_time)}
        dog._kill_hung()
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        assert (child.returncode == -9) is killed
    finally:
        child.kill()
        child.wait()
    heartbeat.remove(child.pid)


def test_hang_s_zero_turns_it_off(shm):
    child = _child_busy_for(shm, 1000.0)
    try:
        dog = StubWatchdog(os.getpid(), "127.0.0.1:1", hang_s=0)
        dog._known = {child.pid: Stub(child.pid, "mm_encoder", "mm_encoder_0", procfs.proc_stat(child.pid).start_time)}
        dog._kill_hung()
        time.sleep(0.2)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_sweep_removes_the_files_of_processes_that_are_gone(shm):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    heartbeat.path_for(gone.pid).write_bytes(b"\0" * 8)
    heartbeat.path_for(os.getpid()).write_bytes(b"\0" * 8)  # a live process: left alone
    (shm / "mm_heartbeat_x").write_bytes(b"")  # not a pid: left alone
    assert heartbeat.sweep() == 1
    assert sorted(p.name for p in shm.iterdir()) == sorted([f"mm_heartbeat_{os.getpid()}", "mm_heartbeat_x"])


def test_finalize_removes_the_stubs_heartbeat_file(shm):
    class _Finalizing(_Model):
        def finalize(self):
            self.seen.append("finalized")

    seen: list = []
    model = _Finalizing(seen)
    model.pb_utils = type("PB", (), {"InferenceResponse": staticmethod(lambda **kw: kw)})
    model.execute([])
    assert heartbeat.path_for(os.getpid()).exists()
    model.finalize()
    assert seen[-1] == "finalized" and not heartbeat.path_for(os.getpid()).exists()


def test_finalize_frees_the_models_objects_after_the_outermost_finalize_only(shm):
    """A subclass's finalize calling super().finalize() still has its attributes afterwards; once the outermost
    returns, the model holds nothing (a pb_utils MetricFamily freed later, when the stub has detached, crashed
    every stub at unload)."""
    import weakref

    class _Held:
        pass

    class _Inner(_Model):
        def finalize(self):
            self.seen.append("inner")

    class _Outer(_Inner):
        def finalize(self):
            super().finalize()
            self.seen.append(("outer sees", type(self.held).__name__))  # still there after the inner one

    seen: list = []
    model = _Outer(seen)
    model.held = _Held()
    held = weakref.ref(model.held)
    model.finalize()
    assert seen == ["inner", ("outer sees", "_Held")]
    assert vars(model) == {} and held() is None
    plain = _Model([])  # no finalize of its own: the base's, wrapped too
    plain.held = _Held()
    held = weakref.ref(plain.held)
    plain.finalize()
    assert held() is None and not heartbeat.path_for(os.getpid()).exists()


def test_overlapping_activities_keep_the_oldest_start(shm):
    """An execute() that overlaps an engine loop iteration neither hides nor restarts the iteration's start:
    the file holds the oldest start of what is under way, and 0.0 once nothing is."""
    hb = heartbeat.Heartbeat(shm)
    hb.beat(True, heartbeat.Activity.ENGINE_LOOP)
    loop_start = heartbeat.busy_since(os.getpid(), shm)
    time.sleep(0.01)
    hb.beat(True)  # an execute starts while the iteration runs
    assert heartbeat.busy_since(os.getpid(), shm) == loop_start
    hb.beat(False, heartbeat.Activity.ENGINE_LOOP)
    execute_start = heartbeat.busy_since(os.getpid(), shm)
    assert execute_start > loop_start  # the execute is what is under way now
    hb.beat(True, heartbeat.Activity.ENGINE_LOOP)  # the next iteration: the execute is older
    assert heartbeat.busy_since(os.getpid(), shm) == execute_start
    hb.beat(False)
    assert heartbeat.busy_since(os.getpid(), shm) > execute_start
    hb.beat(False, heartbeat.Activity.ENGINE_LOOP)
    assert heartbeat.busy_since(os.getpid(), shm) == 0.0


def test_the_engine_metrics_mark_the_loop_and_the_test_knob_hangs_it(shm, monkeypatch):
    from mm_triton.engine_metrics import EngineMetrics

    metrics = EngineMetrics.__new__(EngineMetrics)  # only the heartbeat part: no Triton metrics needed
    metrics._hang_name = "mm_language/engine"
    flag = shm / "hang"
    flag.write_text("mm_language/engine")
    monkeypatch.setenv("MM_TEST_HANG_FILE", str(flag))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (metrics.on_loop_work(True), done.set()), daemon=True)
    worker.start()
    time.sleep(0.3)
    assert not done.is_set() and heartbeat.busy_since(os.getpid()) > 0
    flag.unlink()
    assert done.wait(2)
    metrics.on_loop_work(False)
    assert heartbeat.busy_since(os.getpid()) == 0.0
