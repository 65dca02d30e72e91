"""Many instances: M encoder x N language instances, each encoder instance with its own sender endpoint
(fixed control port control_port + i) and each language instance with its own receiver.

* 2 x 2 split over two servers started with the real command (``scripts/serve --role encoder
  --encoder-instances 2 --control-port P`` and ``scripts/serve --role language --language-instances 2``);
* 2 x 2 in one server (``--role all``'s repository generated with 2 + 2 instances).

Concurrent requests must spread over every instance (per-instance ``mm_`` metrics, Triton's per-model
statistics), give the oracle's tokens, and leave every pool at 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from harness import (
    REPO_ROOT,
    TritonServer,
    child_setup,
    free_run,
    kill_group,
    metric_value,
    parse_metrics,
    port_is_free,
)
from mm_bench.images import make_test_image
from mm_client import MMClient
from mm_remote.repository import build_repository

pytestmark = pytest.mark.integration
PROMPT = "Describe the image."
MAX_TOKENS = 5
IMAGES = {"small": (96, 31), "one_cont": (1500, 32), "two_cont": (2500, 33)}
MIX = [
    "small",
    "two_cont",
    "one_cont",
    "small",
    "one_cont",
    "small",
    "two_cont",
    "small",
    "small",
    "one_cont",
    "small",
    "small",
]
LOG_DIR = Path(os.environ.get("MM_CACHE", REPO_ROOT / ".cache")) / "logs" / "tests"


@pytest.fixture(scope="module")
def images(tiny_model_dir):
    return {name: make_test_image(tokens=t, seed=s, model_dir=tiny_model_dir) for name, (t, s) in IMAGES.items()}


@pytest.fixture(scope="module")
def oracle(monolithic_tokens):
    def expected(image_bytes, prompt=PROMPT, max_tokens=MAX_TOKENS):
        return monolithic_tokens(image_bytes, prompt, max_tokens)

    return expected


class Served:
    """``scripts/serve.py ARGS`` in its own process group (dies with this process), ready when it says so."""

    def __init__(self, name: str, args: list[str], timeout_s: float = 300) -> None:
        base = free_run(3)
        self.http_port, self.grpc_port, self.metrics_port = base, base + 1, base + 2
        self.log_file = LOG_DIR / f"instances-{name}.log"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "scripts/serve.py",
            *args,
            "--address",
            "127.0.0.1",
            "--port-base",
            str(base),
            "--log-file",
            str(self.log_file),
        ]
        parent = os.getpid()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: child_setup(parent, True),
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"scripts/serve {' '.join(args)} did not start:\n{self.output}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "tritonserver ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)
        self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def split_2x2(tiny_model_dir):
    control_base = free_run(2)
    common = ["--checkpoint", str(tiny_model_dir)]
    started: list[Served] = []
    try:
        t0 = time.monotonic()
        # every interface bound, loopback advertised: the options of a multi-host deployment, on one host
        encoder = Served(
            "encoder",
            [
                "--role",
                "encoder",
                "--encoder-instances",
                "2",
                "--control-host",
                "0.0.0.0",
                "--advertise-host",
                "127.0.0.1",
                "--control-port",
                str(control_base),
                *common,
            ],
        )
        started.append(encoder)
        language = Served(
            "language", ["--role", "language", "--language-instances", "2", "--encoder-url", encoder.grpc_url, *common]
        )
        started.append(language)
        print(f"2x2 split servers up in {time.monotonic() - t0:.1f} s")
        yield encoder, language, control_base
        for served in started:
            assert _pools_empty(served), f"{served.log_file}: blocks still in use"
    finally:
        codes = [s.stop() for s in started]
    assert codes == [0] * len(started), "scripts/serve did not stop cleanly"


def _pools_empty(server, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while metric_value(server.metrics(), "mm_pool_blocks_used", 0.0) != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _success(url: str, model: str) -> int:
    client = httpclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def _run_concurrently(url: str, images, oracle) -> None:
    def one(i):
        protocol = "grpc" if i % 2 else "http"
        with MMClient(url[protocol], protocol=protocol, timeout_s=300) as client:
            return client.generate([images[MIX[i]]], PROMPT, max_tokens=MAX_TOKENS).token_ids

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(MIX)) as pool:
        results = list(pool.map(one, range(len(MIX))))
    print(f"{len(MIX)} concurrent requests: {time.monotonic() - t0:.2f} s")
    for name, got in zip(MIX, results):
        assert got == oracle([images[name]]), name


def _per_instance(metrics, name: str, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in metrics.items():
        d = dict(labels)
        if n == name and d.get("model") == model:
            out[d["instance"]] = out.get(d["instance"], 0.0) + v
    return out


def test_split_control_ports_are_fixed_per_instance(split_2x2):
    encoder, _language, control_base = split_2x2
    assert f"tcp://127.0.0.1:{control_base}  (mm_encoder_0_0)" in encoder.output
    assert f"tcp://127.0.0.1:{control_base + 1}  (mm_encoder_0_1)" in encoder.output
    assert not port_is_free(control_base, "0.0.0.0") and not port_is_free(control_base + 1, "0.0.0.0")
    assert "MM_CONTROL_HOST=0.0.0.0 MM_ADVERTISE_HOST=127.0.0.1" in encoder.output


def test_split_2x2_concurrent_requests_spread_over_all_instances(split_2x2, images, oracle):
    encoder, language, _ = split_2x2
    before = {
        "enc": _per_instance(encoder.metrics(), "mm_images_encoded_total", "mm_encoder"),
        "lang": _per_instance(language.metrics(), "mm_transfers_total", "mm_language"),
        "stats": (
            _success(encoder.http_url, "mm_encoder"),
            _success(language.http_url, "mm_language"),
            _success(language.http_url, "mm_pipeline"),
        ),
    }
    _run_concurrently({"http": language.http_url, "grpc": language.grpc_url}, images, oracle)
    enc = _per_instance(encoder.metrics(), "mm_images_encoded_total", "mm_encoder")
    lang = _per_instance(language.metrics(), "mm_transfers_total", "mm_language")
    enc_delta = {k: v - before["enc"].get(k, 0.0) for k, v in enc.items()}
    lang_delta = {k: v - before["lang"].get(k, 0.0) for k, v in lang.items()}
    print("images encoded per encoder instance:", enc_delta, "transfers per language instance:", lang_delta)
    assert sorted(enc_delta) == ["mm_encoder_0_0", "mm_encoder_0_1"]
    assert sorted(lang_delta) == ["mm_language_0_0", "mm_language_0_1"]
    assert all(v > 0 for v in enc_delta.values()) and sum(enc_delta.values()) == len(MIX)
    assert all(v > 0 for v in lang_delta.values()) and sum(lang_delta.values()) == len(MIX)
    stats = (
        _success(encoder.http_url, "mm_encoder"),
        _success(language.http_url, "mm_language"),
        _success(language.http_url, "mm_pipeline"),
    )
    assert [a - b for a, b in zip(stats, before["stats"])] == [len(MIX)] * 3
    assert _pools_empty(encoder) and _pools_empty(language)


def test_split_2x2_several_images_in_prompt_order(split_2x2, images, oracle):
    _encoder, language, _ = split_2x2
    order = [images["two_cont"], images["small"], images["one_cont"]]
    with MMClient(language.grpc_url, protocol="grpc", timeout_s=300) as client:
        assert client.generate(order, PROMPT, max_tokens=MAX_TOKENS).token_ids == oracle(order)


def test_one_server_2x2(tiny_model_dir, tmp_path, images, oracle):
    repo = build_repository(
        tmp_path / "repo",
        "all",
        encoder_instances=2,
        language_instances=2,
        models=["mm_encoder", "mm_language", "mm_pipeline"],
    )
    with TritonServer(
        repo, env={"MM_CHECKPOINT": str(tiny_model_dir)}, log_file=LOG_DIR / "instances-all.log", startup_timeout_s=300
    ) as server:
        _run_concurrently({"http": server.http_url, "grpc": server.grpc_url}, images, oracle)
        m = server.metrics()
        enc = _per_instance(m, "mm_pool_blocks_total", "mm_encoder")
        lang = _per_instance(m, "mm_transfers_total", "mm_language")
        print("transfers per language instance:", lang)
        assert sorted(enc) == ["mm_encoder_0_0", "mm_encoder_0_1"]
        assert sorted(lang) == ["mm_language_0_0", "mm_language_0_1"] and all(v > 0 for v in lang.values())
        assert all(v > 0 for v in _per_instance(m, "mm_images_encoded_total", "mm_encoder").values())
        assert _pools_empty(server)
