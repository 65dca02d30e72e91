"""scripts/bench_transfer.py --mode cpu: the shm and host pulls from a sender in its own process, beside a raw memcpy
and one ZeroMQ round trip of the same run, every embedding checked."""

from __future__ import annotations

import json

import bench_transfer


def test_cpu_mode_reports_shm_beside_host_memcpy_and_round_trip(tmp_path):
    argv = ["--mode", "cpu", "--tokens", "64,1024", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert bench_transfer.main(argv) == 0  # 0: every pull over the transport it names, bit-exact, one chunk
    data = json.loads((tmp_path / "bench_transfer_cpu.json").read_text())
    assert [r["tokens"] for r in data["rows"]] == [64, 1024] and data["iters"] == 20
    row = data["rows"][1]
    assert row["ok"] and row["bytes"] == 1024 * 3584 * 2
    for key in ("pull_shm", "ready_shm", "pull_host", "ready_host", "memcpy", "rtt", "payload_reply"):
        assert row["median_s"][key] > 0 and row["min_s"][key] <= row["median_s"][key]
    assert {"first_chunk", "ready", "acked"} <= set(row["shm_phases_us"]) and "sent" not in row["shm_phases_us"]
    assert "sent" in row["host_phases_us"]  # the host pull PULLs, the shm pull CLAIMs
    target = data["target"]
    assert target["tokens"] == 1024 and target["shm_ratio"] == row["shm_ratio_to_memcpy_plus_rtt"]
    assert isinstance(target["shm_met"], bool) and isinstance(target["host_met"], bool)
