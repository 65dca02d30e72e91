"""scripts/bench_pipeline.py without a server: options, input data, helpers."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
import bench_pipeline  # noqa: E402


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        bench_pipeline.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "perf_analyzer",
        "--concurrency",
        "--request-rates",
        "--quick",
        "--url",
        "--metrics-url",
        "--server-pid",
        "continuation",
        "pool",
        "RSS",
        "--monolithic-instances",
        "examples:",
    ):
        assert word in out, word


def test_defaults_and_quick():
    args = bench_pipeline.parse_args([])
    assert args.concurrency == [1, 2, 4, 8, 16, 32, 64, 100] and args.models == ["mm_pipeline", "mm_monolithic"]
    assert args.request_rates == "auto" and not args.embedding_cache
    quick = bench_pipeline.parse_args(["--quick"])
    assert quick.concurrency == [1, 4] and quick.images == 6 and quick.mix.max_tokens <= 2500
    assert bench_pipeline.parse_args(["--request-rates", "1,2.5"]).request_rates == [1.0, 2.5]
    assert bench_pipeline.parse_args(["--request-rates", "none"]).request_rates == "none"
    for bad in (["--concurrency", "0"], ["--request-rates", "-1"], ["--env", "NOEQUALS"], ["--models", ","]):
        with pytest.raises(SystemExit):
            bench_pipeline.parse_args(bad)


def test_inputs_follow_the_mix(tmp_path, tiny_model_dir):
    args = bench_pipeline.parse_args(
        ["--images", "5", "--mix", "1500,0.2,1100,2000", "--work-dir", str(tmp_path), "--max-tokens", "3"]
    )
    path, tokens = bench_pipeline.build_inputs(args, tiny_model_dir)
    data = json.loads(path.read_text())["data"]
    assert len(data) == 5 and all(1100 <= t <= 2100 for t in tokens)
    raw = base64.b64decode(data[0]["IMAGE"]["b64"])
    assert raw[4:8] == b"\x89PNG" and int.from_bytes(raw[:4], "little") == len(raw) - 4
    assert data[0]["MAX_TOKENS"]["content"] == [3]
    assert bench_pipeline.expected_continuations([100, 1024, 1025, 3000]) == pytest.approx((0 + 0 + 1 + 2) / 4)


def test_default_inputs_are_ordinary_photos(tmp_path, tiny_model_dir):
    args = bench_pipeline.parse_args(["--images", "3", "--work-dir", str(tmp_path), "--max-tokens", "3"])
    path, tokens = bench_pipeline.build_inputs(args, tiny_model_dir)
    data = json.loads(path.read_text())["data"]
    raw = base64.b64decode(data[2]["IMAGE"]["b64"])
    assert raw[4:6] == b"\xff\xd8"  # JPEG photos, 640x480 ... 1024x768, each resized to the tiny cap
    assert len(set(tokens)) == 1 and 3900 <= tokens[0] <= 4096  # 4:3 photos: the same token grid


def test_token_agreement():
    rows = [
        {"model": "a", "token_ids": {"k1": [[1, 2]], "k2": [[3]]}},
        {"model": "a", "token_ids": {"k1": [[1, 2]]}},
        {"model": "b", "token_ids": {"k1": [[1, 2]], "k2": [[3]]}},
    ]
    assert bench_pipeline.token_agreement(rows) == {
        "inputs": 2,
        "consistent_within_model": True,
        "equal_across_models": True,
    }
    assert all("token_ids" not in r for r in rows)
    rows = [{"model": "a", "token_ids": {"k1": [[1, 2]]}}, {"model": "b", "token_ids": {"k1": [[9]]}}]
    assert bench_pipeline.token_agreement(rows)["equal_across_models"] is False


def test_instance_copy(tmp_path):
    repo = bench_pipeline.instance_copy(ROOT / "model_repository", "mm_monolithic", 2, tmp_path)
    config = (repo / "mm_monolithic" / "config.pbtxt").read_text()
    assert "count: 2" in config and "count: 1" not in config
    assert (repo / "mm_monolithic" / "1" / "model.py").is_file()


def test_gpu_placement_options_and_repository(tmp_path):
    args = bench_pipeline.parse_args(
        [
            "--gpu",
            "mm_encoder=0",
            "--gpu",
            "mm_language=1",
            "--gpu",
            "mm_monolithic=0,1",
            "--request-rates",
            "auto1",
            "--load-generator",
            "python",
        ]
    )
    assert args.gpus == {"mm_encoder": [0], "mm_language": [1], "mm_monolithic": [0, 1]}
    assert args.request_rates == "auto1" and args.load_generator == "python"
    for bad in (
        ["--gpu", "mm_encoder"],
        ["--gpu", "mm_encoder=x"],
        ["--gpu", "=0"],
        ["--gpu", "mm_encoder=0,0"],
        ["--gpu", "mm_encoder=0", "--gpu", "mm_encoder=1"],
    ):
        with pytest.raises(SystemExit):
            bench_pipeline.parse_args(bad)
    repo = bench_pipeline.repository_variant(
        ROOT / "model_repository", tmp_path, counts={"mm_monolithic": 2}, gpus=args.gpus
    )
    enc = (repo / "mm_encoder" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 0 ] } ]" in enc and "KIND_CPU" not in enc
    mono = (repo / "mm_monolithic" / "config.pbtxt").read_text()
    assert "{ count: 2, kind: KIND_GPU, gpus: [ 0 ] }, { count: 2, kind: KIND_GPU, gpus: [ 1 ] }" in mono
    assert (repo / "mm_pipeline" / "config.pbtxt").read_text() == (
        ROOT / "model_repository" / "mm_pipeline" / "config.pbtxt"
    ).read_text()
    assert (repo / "mm_language" / "1" / "model.py").is_file() and (repo / "mm_pipeline" / "1").is_dir()
    with pytest.raises(ValueError, match="no model mm_nothing"):
        bench_pipeline.repository_variant(ROOT / "model_repository", tmp_path, gpus={"mm_nothing": [0]})
