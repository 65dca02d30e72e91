"""mm_bench basics: length mixes, tables, result JSON, perf_analyzer glue, /proc samplers."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mm_bench import perf
from mm_bench.lengths import LogNormalMix, summarize
from mm_bench.report import machine_info, machine_line, table, write_json
from mm_bench.sampling import CpuAccount, MemorySampler, PoolSampler, descendants, memory_kib, metric_sum, process_label


def test_lognormal_mix_is_reproducible_clipped_and_realistic():
    mix = LogNormalMix()
    a, b = mix.sample(50_000, seed=3), mix.sample(50_000, seed=3)
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert a.min() >= 64 and a.max() <= 8192
    s = summarize(a)
    assert 700 < s["p50"] < 900 and 1800 < s["p90"] < 2400 and 0.3 < s["share_above_1024"] < 0.45
    assert mix.quantile(0.5) == pytest.approx(800)
    assert not np.array_equal(a, mix.sample(50_000, seed=4))


def test_stratified_spans_the_mix():
    mix = LogNormalMix()
    a = mix.stratified(24, seed=1)
    assert sorted(a) == sorted(mix.stratified(24, seed=2)) and not np.array_equal(a, mix.stratified(24, seed=2))
    assert 150 < a.min() < 250 and 3000 < a.max() < 4500 and int(np.median(a)) in range(700, 900)
    assert len(mix.stratified(0)) == 0


def test_mix_parse_and_validation():
    assert LogNormalMix.parse("1000,0.5") == LogNormalMix(1000, 0.5)
    assert LogNormalMix.parse("1000, 0.5, 128, 4096") == LogNormalMix(1000, 0.5, 128, 4096)
    for bad in ("1000", "a,b", "1,2,3"):
        with pytest.raises(ValueError):
            LogNormalMix.parse(bad)
    with pytest.raises(ValueError):
        LogNormalMix(100, 0.5, 200, 100)
    assert summarize([]) == {"count": 0}


def test_table_text_and_markdown():
    rows = [{"a": "x", "b": 1.23456, "c": None}, {"a": "longer", "b": 12345.6, "c": 3}]
    text = table(rows, [("a", "name"), ("b", "value", ".1f"), ("c", "c")])
    lines = text.splitlines()
    assert lines[0].startswith("name") and "12345.6" in text and "-" in lines[2]
    md = table(rows, [("a", "name"), ("b", "value", ".2f")], markdown=True)
    assert md.splitlines()[0] == "| name | value |" and md.splitlines()[1] == "|---|---:|"
    assert "| longer | 12345.60 |" in md


def test_write_json_machine_info(tmp_path):
    info = machine_info()
    assert info["nproc"] == os.cpu_count() and info["python"] and "utc" in info
    assert "CPU cores" in machine_line(info)
    path = write_json(
        tmp_path / "sub" / "r.json",
        {"machine": info, "n": np.int64(3), "x": np.float32(0.5), "arr": np.arange(3), "p": tmp_path},
    )
    data = json.loads(path.read_text())
    assert data["n"] == 3 and data["arr"] == [0, 1, 2] and data["x"] == 0.5


# ---- perf_analyzer glue ---------------------------------------------------------------------
def test_bytes_input_is_a_serialized_tensor():
    """perf_analyzer reads a BYTES input's b64 as Triton's wire form: <u32 length><bytes> per element."""
    entry = perf.request_entry([b"\x89PNG-one", b"two"], "Describe", 4)
    raw = base64.b64decode(entry["IMAGE"]["b64"])
    assert raw == (8).to_bytes(4, "little") + b"\x89PNG-one" + (3).to_bytes(4, "little") + b"two"
    assert entry["IMAGE"]["shape"] == [2]
    assert entry["PROMPT"] == {"content": ["Describe"], "shape": [1]}
    assert entry["MAX_TOKENS"] == {"content": [4], "shape": [1]}
    assert "MAX_TOKENS" not in perf.request_entry([b"x"], "p", None)


def test_write_input_data(tmp_path):
    path = perf.write_input_data(tmp_path / "in.json", [perf.request_entry([b"a"], "p", 1)] * 3)
    assert len(json.loads(path.read_text())["data"]) == 3


def test_command_lines():
    cmd = perf.command(
        "pa", "mm_pipeline", "h:1", "in.json", "o.csv", concurrency=4, request_count=20, profile_export="e.json"
    )
    assert cmd[:3] == ["pa", "-m", "mm_pipeline"]
    assert ["--concurrency-range", "4"] == cmd[cmd.index("--concurrency-range") :][:2]
    assert "--profile-export-file" in cmd and "--request-rate-range" not in cmd
    cmd = perf.command("pa", "m", "h:1", "in", "o", request_rate=2.5, max_threads=2, extra=["-a"])
    assert cmd[cmd.index("--request-rate-range") + 1] == "2.5" and "poisson" in cmd and cmd[-1] == "-a"
    for kwargs in ({}, {"concurrency": 1, "request_rate": 1.0}, {"concurrency": 0}, {"request_rate": -1.0}):
        with pytest.raises(ValueError):
            perf.command("pa", "m", "h:1", "in", "o", **kwargs)


CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,\
request/response,response wait
2,19.983,11,438,44317,49,47702,619,4,91563,94020,94565,147675,15,93089
"""


def test_parse_csv():
    out = perf.parse_csv(CSV)
    assert out["throughput"] == pytest.approx(19.983)
    assert out["p50_ms"] == pytest.approx(91.563) and out["p99_ms"] == pytest.approx(147.675)
    assert out["server_queue_ms"] == pytest.approx(44.317)
    with pytest.raises(ValueError):
        perf.parse_csv(CSV.splitlines()[0])


def test_profile_export_with_raw_bytes(tmp_path):
    """The export embeds BYTES inputs raw (not UTF-8); latencies and per-input tokens come out."""

    def req(t0_ms, dt_ms, image, ids):
        return (
            b'{"timestamp":%d,"request_inputs":{"PROMPT":"p","IMAGE":"' % int(t0_ms * 1e6)
            + image
            + b'"},"response_timestamps":[%d],"response_outputs":[{"TOKEN_IDS":%s,"TEXT":"x"}]}'
            % (int((t0_ms + dt_ms) * 1e6), json.dumps(ids).encode())
        )

    reqs = [
        req(0, 100, b"\x89PNG\xff\x00A", [1, 2]),
        req(50, 200, b"\x89PNG\xfeB", [3]),
        req(100, 100, b"\x89PNG\xff\x00A", [1, 2]),
    ]
    failed = b'{"timestamp":5,"request_inputs":{},"response_timestamps":[]}'
    blob = (
        b'{"experiments":[{"experiment":{"mode":"concurrency","value":2},"requests":['
        + b",".join(reqs + [failed])
        + b'],"window_boundaries":[0,1]}],"version":"2.51.0"}'
    )
    (tmp_path / "e.json").write_bytes(blob)
    out = perf.summarize_profile(perf.load_profile_export(tmp_path / "e.json"))
    assert out["completed"] == 3 and out["errors"] == 1
    assert out["span_s"] == pytest.approx(0.25) and out["throughput"] == pytest.approx(12.0)
    assert out["p50_ms"] == pytest.approx(100.0) and out["max_ms"] == pytest.approx(200.0)
    assert sorted(map(str, out["token_ids"].values())) == ["[[1, 2]]", "[[3]]"]


# ---- samplers -------------------------------------------------------------------------------
def test_process_tree_memory_and_labels():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(60 * 2**20); time.sleep(30)"])
    try:
        time.sleep(0.5)
        assert child.pid in descendants(os.getpid())
        rss, pss = memory_kib(child.pid)
        assert rss > 50 * 1024
        assert process_label(child.pid).startswith("python")
        with MemorySampler(os.getpid(), interval_s=0.05) as mem:
            time.sleep(0.2)
        res = mem.result()
        assert res["peak_rss_mib"] > 60 and res["samples"] >= 2
        assert any(k.startswith("python") for k in res["peak_rss_by_process_mib"])
    finally:
        child.kill()
        child.wait()
    assert memory_kib(child.pid) == (0, None)


def test_cpu_account_sees_a_busy_child():
    with CpuAccount(0) as cpu:
        subprocess.run(
            [sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"],
            check=True,
        )
    res = cpu.result()
    assert res["load_generator"] > 0.2 and res["nproc"] == os.cpu_count()
    assert set(res) >= {"total", "server", "bench", "other"}


def test_pool_sampler_and_metric_sum():
    samples = iter(
        [
            {
                ("mm_pool_blocks_used", (("instance", "e0"), ("model", "mm_encoder"))): 10.0,
                ("mm_pool_blocks_total", (("instance", "e0"), ("model", "mm_encoder"))): 100.0,
                ("mm_pool_blocks_used", (("instance", "l0"), ("model", "mm_language"))): 0.0,
                ("mm_pool_blocks_total", (("instance", "l0"), ("model", "mm_language"))): 64.0,
            },
            {
                ("mm_pool_blocks_used", (("instance", "e0"), ("model", "mm_encoder"))): 30.0,
                ("mm_pool_blocks_total", (("instance", "e0"), ("model", "mm_encoder"))): 100.0,
                ("mm_pool_blocks_used", (("instance", "l0"), ("model", "mm_language"))): 8.0,
            },
        ]
    )

    def fetch():
        return next(samples)

    sampler = PoolSampler(fetch)
    sampler.sample()
    sampler.sample()
    sampler.sample()  # StopIteration counts as a failed scrape
    res = sampler.result()
    assert res["mm_encoder"]["max_utilisation"] == pytest.approx(0.3)
    assert res["mm_encoder"]["mean_utilisation"] == pytest.approx(0.2)
    assert res["mm_language"]["max_used"] == 8 and sampler.errors == 1
    m = {("x", (("model", "a"),)): 1.0, ("x", (("model", "b"),)): 2.0}
    assert metric_sum(m, "x") == 3.0 and metric_sum(m, "x", model="b") == 2.0 and metric_sum(m, "y") == 0.0


def test_gpu_memory_sampler_with_a_fake_nvidia_smi(tmp_path, monkeypatch):
    from mm_bench.sampling import GpuMemorySampler, gpu_memory_used_mib

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "0, 1234"\necho "1, 5678"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    assert gpu_memory_used_mib() == {0: 1234.0, 1: 5678.0}
    with GpuMemorySampler({0: 1000.0, 1: 600.0}, interval_s=0.05) as sampler:
        pass
    result = sampler.result()
    assert result["peak_used_mib"] == {"0": 1234.0, "1": 5678.0}
    assert result["peak_server_mib"] == {"0": 234.0, "1": 5078.0} and result["samples"] >= 2
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert gpu_memory_used_mib() is None
