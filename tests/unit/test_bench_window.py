"""scripts/bench_window.py and mm_bench.window: fixed vs adaptive window through the real policies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mm_bench.lengths import LogNormalMix
from mm_bench.window import PolicySpec, parse_policies, plan_policy, run_endpoints
from mmtransfer import TransferConfig

ROOT = Path(__file__).resolve().parents[2]
import bench_window  # noqa: E402

BASE = TransferConfig(adaptive_min_samples=8)


def test_policy_specs():
    assert parse_policies("fixed, adaptive:75,adaptive") == [
        PolicySpec("fixed"),
        PolicySpec("adaptive", 75.0),
        PolicySpec("adaptive", 90.0),
    ]
    assert PolicySpec("adaptive", 99).label == "adaptive p99"
    assert PolicySpec("adaptive", 99).config(BASE).window_policy == "adaptive"
    for bad in ("magic", "fixed:3"):
        with pytest.raises(ValueError):
            PolicySpec.parse(bad)


def test_fixed_plan_matches_the_continuation_formula():
    lengths = [100, 1024, 1025, 3000, 5000]
    row = plan_policy(BASE, PolicySpec("fixed"), lengths, hint=True)
    expected = [math.ceil(n / 1024) - 1 for n in lengths]
    assert row["continuations_per_transfer"] == pytest.approx(np.mean(expected))
    assert row["continuation_rate"] == pytest.approx(3 / 5)
    assert row["max_window_blocks"] == 8
    assert plan_policy(BASE, PolicySpec("fixed"), lengths, hint=False)["mean_window_blocks"] == 8


def test_adaptive_cuts_continuations_on_the_mix():
    lengths = LogNormalMix().sample(3000, seed=5)
    fixed = plan_policy(BASE, PolicySpec("fixed"), lengths, hint=True)
    adaptive = plan_policy(BASE, PolicySpec("adaptive", 90), lengths, hint=True)
    assert adaptive["continuation_rate"] < fixed["continuation_rate"] / 2
    assert adaptive["mean_block_chunks"] < fixed["mean_block_chunks"]
    assert 1024 < adaptive["final_window_tokens"] <= BASE.adaptive_max_window_tokens


@pytest.mark.parametrize("hint", [True, False])
def test_real_endpoints_agree_with_the_arithmetic(hint):
    lengths = LogNormalMix().sample(60, seed=2)
    spec = PolicySpec("adaptive", 90)
    real = run_endpoints(BASE, spec, lengths, hint, hidden=16)
    plan = plan_policy(BASE, spec, lengths, hint)
    for key in ("transfers", "continuation_rate", "continuations_per_transfer", "mean_window_blocks"):
        assert real[key] == pytest.approx(plan[key]), key
    assert real["receiver_blocks_leaked"] == 0 and real["sender_blocks_leaked"] == 0
    assert real["block_token_seconds"] > 0


def test_real_endpoints_with_threads_share_the_pool():
    lengths = LogNormalMix().sample(40, seed=3)
    row = run_endpoints(BASE.replace(pool_blocks=16), PolicySpec("fixed"), lengths, True, hidden=8, threads=4)
    assert row["transfers"] == 40 and row["max_window_blocks"] <= 16
    assert row["receiver_blocks_leaked"] == 0


def test_script_quick(tmp_path, capsys):
    assert (
        bench_window.main(
            [
                "--quick",
                "--transfers",
                "60",
                "--plan-samples",
                "2000",
                "--policies",
                "fixed,adaptive:90",
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "adaptive p90" in out and "chunk_plan" in out
    data = json.loads((tmp_path / "window.json").read_text())
    assert len(data["endpoints"]) == 4 and len(data["chunk_plan"]) == 4  # 2 policies x hint on/off
    assert (tmp_path / "window.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        bench_window.main(["--policies", "bogus"])
