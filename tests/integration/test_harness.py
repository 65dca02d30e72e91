"""The test harness against a real tritonserver, with throwaway Python-backend repositories built in tmp_path;
also the client library, the CLI and scripts/serve end to end against a stand-in mm_pipeline model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness import (
    REPO_ROOT,
    TritonServer,
    TritonStartError,
    free_port,
    group_members,
    metric_value,
    parse_metrics,
    port_is_free,
    write_fake_pipeline_repo,
    write_identity_repo,
)
from mm_triton.procfs import proc_stat


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = proc_stat(pid)
    return stat is not None and stat.alive  # a zombie is dead for our purposes


# ----------------------------------------------------------------------------- pure: metrics parser
METRICS_SAMPLE = r"""
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="identity",version="1"} 3
nv_inference_request_success{model="other",version="1"} 2
# TYPE mm_transfer_latency_seconds histogram
mm_transfer_latency_seconds_bucket{instance="enc_0",le="0.001"} 1
mm_transfer_latency_seconds_bucket{instance="enc_0",le="+Inf"} 4
mm_transfer_latency_seconds_sum{instance="enc_0"} 0.25
mm_transfer_latency_seconds_count{instance="enc_0"} 4
weird_labels{a="x,y",b="q\"uote",c="back\\slash"} 1.5e3
nv_gpu_utilization 0 1700000000000
"""


def test_parse_metrics_labels_and_values():
    m = parse_metrics(METRICS_SAMPLE)
    assert m[("nv_inference_request_success", (("model", "identity"), ("version", "1")))] == 3.0
    assert m[("mm_transfer_latency_seconds_bucket", (("instance", "enc_0"), ("le", "+Inf")))] == 4.0
    assert m[("weird_labels", (("a", "x,y"), ("b", 'q"uote'), ("c", "back\\slash")))] == 1500.0
    assert m[("nv_gpu_utilization", ())] == 0.0  # timestamp ignored
    assert metric_value(m, "nv_inference_request_success") == 5.0
    assert metric_value(m, "nv_inference_request_success", model="identity") == 3.0
    assert metric_value(m, "mm_transfer_latency_seconds_count") == 4.0
    assert metric_value(m, "missing", default=0.0) == 0.0
    with pytest.raises(KeyError):
        metric_value(m, "nv_inference_request_success", model="nope")


# ------------------------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def identity_repo(tmp_path_factory) -> Path:
    return write_identity_repo(tmp_path_factory.mktemp("identity_repo"))


@pytest.mark.integration
def test_server_starts_infers_and_stops(identity_repo, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server = TritonServer(
        identity_repo,
        env={"HARNESS_ECHO_ENV": "hello-from-env"},
        args=["--log-verbose=0"],
        log_file=tmp_path / "server.log",
    )
    with server:
        assert server.is_running()
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        assert len(set(ports)) == 3 and not any(port_is_free(p) for p in ports)
        assert server.model_ready("identity")
        x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
        text = np.array([b"a", "\u00e9t\u00e9".encode()], dtype=np.object_)

        # HTTP
        client = httpclient.InferenceServerClient(server.http_address)
        inputs = [httpclient.InferInput("INPUT0", [3], "FP32"), httpclient.InferInput("TEXT_IN", [2], "BYTES")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(text)
        r = client.infer("identity", inputs)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
        assert list(r.as_numpy("TEXT_OUT")) == list(text)
        assert r.as_numpy("ENV")[0] == b"hello-from-env"  # extra env reached the Python stub
        # The stub runs this venv's interpreter: same CPython build, same environment (numpy from the venv).
        version, prefix, numpy_file = (v.decode() for v in r.as_numpy("PYINFO"))
        assert version == sys.version
        assert Path(prefix) == Path(sys.prefix)
        assert Path(numpy_file).resolve() == Path(np.__file__).resolve()
        client.close()

        # gRPC
        gclient = grpcclient.InferenceServerClient(server.grpc_url)
        ginputs = [grpcclient.InferInput("INPUT0", [3], "FP32")]
        ginputs[0].set_data_from_numpy(x * 2)
        r = gclient.infer("identity", ginputs)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x * 2)
        gclient.close()

        # metrics
        # Triton counts a success when it releases the request, which may come just after the client
        # has its response: poll for a while instead of reading once.
        deadline = time.monotonic() + 10.0
        while True:
            metrics = parse_metrics(server.metrics_text())
            successes = metric_value(metrics, "nv_inference_request_success", model="identity")
            if successes >= 2.0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert successes == 2.0
        assert server.metrics_url.endswith("/metrics")
        pid = server.pid
        stub_pids = [p for p in group_members(pid) if p != pid]
        assert stub_pids, "expected the Python stub in the server's process group"

    assert not server.is_running()
    assert server.proc.returncode == 0  # graceful SIGTERM exit
    assert not _pid_alive(pid)
    assert not any(_pid_alive(p) for p in stub_pids)
    assert all(port_is_free(p) for p in ports)
    assert "successfully loaded 'identity'" in server.log_text()
    server.stop()  # idempotent


@pytest.mark.integration
def test_server_stopped_when_test_body_raises(identity_repo, tmp_path):
    server = TritonServer(identity_repo, log_file=tmp_path / "server.log")
    with pytest.raises(ZeroDivisionError):
        with server:
            pid = server.pid
            raise ZeroDivisionError("an error inside the with block")
    assert not _pid_alive(pid)
    assert port_is_free(server.http_port)


@pytest.mark.integration
def test_start_failure_reports_log_tail(identity_repo, tmp_path):
    server = TritonServer(
        identity_repo, env={"HARNESS_FAIL_INIT": "marker-1234"}, log_file=tmp_path / "server.log", startup_timeout_s=60
    )
    t0 = time.monotonic()
    with pytest.raises(TritonStartError) as exc:
        server.start()
    assert time.monotonic() - t0 < 60
    assert "marker-1234" in str(exc.value)  # the model's own error, from the log tail
    assert not server.is_running()


@pytest.mark.integration
def test_start_timeout_kills_server(identity_repo, tmp_path):
    server = TritonServer(identity_repo, log_file=tmp_path / "server.log", startup_timeout_s=0.01)
    with pytest.raises(TritonStartError, match="not ready after"):
        server.start()
    assert not server.is_running()
    assert not _pid_alive(server.pid)


@pytest.mark.integration
def test_missing_repository_is_clear(tmp_path):
    with pytest.raises(TritonStartError, match="model repository not found"):
        TritonServer(tmp_path / "nope").start()


@pytest.mark.integration
def test_fixture_factory_and_parent_death(identity_repo, triton_server, tmp_path):
    """The factory fixture starts servers; a server outlives no killed parent (PR_SET_PDEATHSIG)."""
    server = triton_server(identity_repo)
    assert server.model_ready("identity")

    # A child python starts a server, prints its pid, then is SIGKILLed: the server must go too.
    code = f"""
import sys, time
from mm_triton.launcher import TritonServer
s = TritonServer({str(identity_repo)!r}, log_file={str(tmp_path / "orphan.log")!r}).start()
print(s.pid, s.http_port, flush=True)
time.sleep(600)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, "child failed to start a server"
        pid, http_port = map(int, line.split())
        assert _pid_alive(pid)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 30
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pid_alive(pid), "tritonserver outlived the process that started it"
    deadline = time.monotonic() + 10
    while not port_is_free(http_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_is_free(http_port)


# ------------------------------------------------------------- client / CLI / serve vs a stand-in pipeline
@pytest.fixture(scope="module")
def fake_pipeline(tmp_path_factory):
    repo = write_fake_pipeline_repo(tmp_path_factory.mktemp("fake_pipeline"))
    with TritonServer(repo, log_file=tmp_path_factory.mktemp("logs") / "fake_pipeline.log") as server:
        yield server


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_generate_against_fake_pipeline(fake_pipeline, protocol, tmp_path):
    from mm_client import BadRequest, MMClient, ServerError, demo_image

    url = fake_pipeline.http_url if protocol == "http" else fake_pipeline.grpc_url
    img = tmp_path / "a.png"
    img.write_bytes(demo_image(64, 48))
    png = demo_image()
    with MMClient(url, protocol=protocol, timeout_s=30) as client:
        assert client.is_ready()
        r = client.generate([img, png], "Describe h\u00e9", max_tokens=5)
        assert r.text == f"images=2 bytes={img.stat().st_size},{len(png)} prompt=Describe h\u00e9 max_tokens=5"
        assert r.token_ids == [0, 1, 2, 3, 4]
        assert r.latency_s > 0
        r = client.generate([png], "no limit")  # MAX_TOKENS not sent
        assert r.text.endswith("max_tokens=None") and r.token_ids == [0, 1, 2, 3]
        with pytest.raises(BadRequest) as exc:
            client.generate([png], "FAIL please")
        assert "bad prompt: FAIL please" in exc.value.message
        with pytest.raises(ServerError) as exc:
            client.generate([png], "CRASH now")
        assert not isinstance(exc.value, BadRequest) and "internal: CRASH now" in exc.value.message
    with MMClient(url, protocol=protocol, model="no_such_model") as client:
        assert not client.is_ready()
        with pytest.raises(BadRequest):
            client.generate([png], "x")


def _run(cmd, timeout=120, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **kw)


@pytest.mark.integration
def test_client_cli_against_fake_pipeline(fake_pipeline, tmp_path):
    img = tmp_path / "x.jpg"
    from mm_client import demo_image

    img.write_bytes(demo_image(32, 32, fmt="JPEG"))
    r = _run(
        [
            "bash",
            "scripts/client",
            "--url",
            fake_pipeline.http_address,
            "--max-tokens",
            "3",
            "--prompt",
            "Describe",
            "--demo-image",
            str(img),
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == [0, 1, 2] and out["images"] == 2 and out["text"].startswith("images=2 ")
    r = _run(
        [
            sys.executable,
            "-m",
            "mm_client.cli",
            "--url",
            fake_pipeline.grpc_url,
            "--protocol",
            "grpc",
            "--prompt",
            "FAIL now",
            str(img),
        ]
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "bad prompt: FAIL now" in r.stderr
    r = _run([sys.executable, "-m", "mm_client.cli", "--url", fake_pipeline.http_address, "--ready"])
    assert r.returncode == 0 and "ready" in r.stdout


@pytest.mark.integration
def test_serve_demo_exit(tmp_path):
    """scripts/serve --demo --exit: sets up, serves, answers the demo, stops, exits with the demo's status."""
    repo = write_fake_pipeline_repo(tmp_path / "repo")
    h, g, m = free_port(), free_port(), free_port()
    while len({h, g, m}) < 3:
        g, m = free_port(), free_port()
    log = tmp_path / "serve.log"
    r = _run(
        [
            "bash",
            "scripts/serve",
            "--model-repository",
            str(repo),
            "--address",
            "127.0.0.1",
            "--http-port",
            str(h),
            "--grpc-port",
            str(g),
            "--metrics-port",
            str(m),
            "--demo",
            "--exit",
            "--demo-max-tokens",
            "7",
            "--pool-blocks",
            "3",
            "--log-file",
            str(log),
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tritonserver ready" in r.stdout
    assert "--- answer (7 tokens" in r.stdout and "prompt=Describe the image. max_tokens=7" in r.stdout
    assert "MM_POOL_BLOCKS=3" in r.stdout
    assert "stopped (exit code 0)" in r.stdout
    assert all(port_is_free(p) for p in (h, g, m))


@pytest.mark.integration
def test_serve_demo_failure_and_sigterm(tmp_path):
    repo = write_fake_pipeline_repo(tmp_path / "repo")
    h, g, m = free_port(), free_port(), free_port()
    while len({h, g, m}) < 3:
        g, m = free_port(), free_port()
    common = [
        "bash",
        "scripts/serve",
        "--model-repository",
        str(repo),
        "--address",
        "127.0.0.1",
        "--http-port",
        str(h),
        "--grpc-port",
        str(g),
        "--metrics-port",
        str(m),
        "--log-file",
        str(tmp_path / "serve.log"),
    ]
    r = _run(common + ["--demo", "--exit", "--demo-prompt", "FAIL demo"], timeout=300)
    assert r.returncode == 1
    assert "demo FAILED" in r.stderr and "bad prompt: FAIL demo" in r.stderr

    # Serving until SIGTERM: stops the server cleanly, exit code 0.
    p = subprocess.Popen(common, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            out.append(line)
            if "tritonserver ready" in line:
                break
        assert any("tritonserver ready" in line for line in out), "".join(out)
        assert not port_is_free(h)
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, "".join(out) + rest
    assert "stopped (exit code 0)" in rest
    assert all(port_is_free(x) for x in (h, g, m))


@pytest.mark.integration
def test_serve_port_in_use_is_clear(fake_pipeline, tmp_path):
    r = _run(
        [
            "bash",
            "scripts/serve",
            "--model-repository",
            str(tmp_path),
            "--address",
            "127.0.0.1",
            "--http-port",
            str(fake_pipeline.http_port),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        ]
    )
    assert r.returncode != 0
    assert f"port {fake_pipeline.http_port} is already in use" in r.stderr
