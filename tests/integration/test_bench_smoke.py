"""SHORT smoke test of scripts/bench_pipeline.py: a real tritonserver, perf_analyzer, metrics and memory
sampling, table/JSON/PNG (about 30 s; the full sweep is for docs/BENCHMARKS.md, not CI)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import server_env

ROOT = Path(__file__).resolve().parents[2]
import bench_pipeline  # noqa: E402
from mm_bench.perf import find_perf_analyzer  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def perf_analyzer():
    path = find_perf_analyzer()
    if not path:
        pytest.skip("perf_analyzer not installed (tritonclient[all]==2.51.0)")
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, env=server_env())
    if "error while loading shared libraries" in probe.stderr:
        pytest.skip(f"perf_analyzer cannot start here ({probe.stderr.strip()}); run scripts/setup")
    return path


def test_bench_pipeline_smoke(perf_analyzer, tiny_model_dir, tmp_path, capsys):
    # 3 images of 1100-1500 tokens: every transfer needs exactly one continuation at the 1024 window
    rc = bench_pipeline.main(
        [
            "--models",
            "mm_pipeline",
            "--concurrency",
            "2",
            "--request-rates",
            "none",
            "--images",
            "3",
            "--mix",
            "1300,0.1,1100,1500",
            "--requests",
            "6",
            "--max-tokens",
            "2",
            "--checkpoint",
            str(tiny_model_dir),
            "--out-dir",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "work"),
            "--name",
            "smoke",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads((tmp_path / "smoke.json").read_text())
    (row,) = data["rows"]
    assert row["rc"] == 0 and row["completed"] == 6 and row["errors"] == 0
    assert row["throughput"] > 0 and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["continuation_ratio"] == pytest.approx(1.0) and row["transfers"] == 6
    assert row["pools"]["mm_encoder"]["blocks_total"] == 256 and row["pools"]["mm_language"]["blocks_total"] == 64
    assert row["peak_rss_mib"] > 100 and {"tritonserver", "mm_encoder", "mm_language"} <= set(
        row["memory"]["peak_rss_by_process_mib"]
    )
    assert data["token_agreement"]["consistent_within_model"] is True
    assert data["machine"]["nproc"] >= 1
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    assert "mm_pipeline" in out and "c=2" in out
