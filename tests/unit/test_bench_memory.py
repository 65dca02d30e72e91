"""scripts/bench_memory.py and mm_bench.memory: real allocators, targets of issue 5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mm_bench.lengths import LogNormalMix
from mm_bench.memory import PoolGeometry, compare, fill_once, make_pool, waste_per_request

ROOT = Path(__file__).resolve().parents[2]
import bench_memory  # noqa: E402


def test_geometry_and_meta_pool_costs_nothing():
    geom = PoolGeometry(64 * 2**20, 1536, "bfloat16", 128)
    assert geom.bytes_per_block == 128 * 1536 * 2 and geom.num_blocks == 170
    pool = make_pool(geom, True, 8192)
    assert pool.storage.device.type == "meta" and pool.total_blocks == 170
    slots = make_pool(geom, False, 8192)
    assert slots.allocator.num_slots == 2 and slots.max_alloc_blocks == 64
    with pytest.raises(ValueError):
        make_pool(PoolGeometry(2**20, 1536, "bfloat16", 128), False, 8192)  # 2 blocks < one slot


def test_fill_once_exact_counts_and_frees():
    geom = PoolGeometry(10 * 128 * 4 * 4, 4, "float32", 128)  # 10 blocks of 128 tokens
    blocks, slots = make_pool(geom, True, 512), make_pool(geom, False, 512)  # slot = 4 blocks -> 2 slots
    lengths = np.array([100, 129, 300, 1, 512, 50])  # 1 + 2 + 3 + 1 + 4 blocks: the 5th does not fit
    assert fill_once(blocks, lengths) == (4, 530, 7 * 128)
    assert fill_once(slots, lengths) == (2, 229, 2 * 512)
    assert blocks.used_blocks == 0 and slots.used_blocks == 0
    assert list(waste_per_request(blocks, np.array([1, 128, 129]))) == [127, 0, 127]
    assert list(waste_per_request(slots, np.array([1, 512]))) == [511, 0]


def test_targets_met_on_the_default_mix():
    row = compare(PoolGeometry(256 * 2**20, 1536, "bfloat16", 128), LogNormalMix(), 8192, trials=20)
    assert row["ratio"] >= 2.0
    assert row["block_waste_mean_blocks"] <= 0.5
    assert row["block_token_utilisation"] > 0.85 > row["slot_token_utilisation"]


def test_script_quick(tmp_path, capsys):
    assert bench_memory.main(["--quick", "--out-dir", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "MET" in out and "MISSED" not in out
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["targets"] == {"ratio_ge_2x": True, "waste_le_half_block": True}
    assert data["machine"]["nproc"] and data["rows"][0]["trials"] == 20
    assert (tmp_path / "memory.png").stat().st_size > 10_000


def test_script_help_and_bad_args(capsys):
    with pytest.raises(SystemExit) as e:
        bench_memory.main(["--help"])
    assert e.value.code == 0 and "fixed slots" in capsys.readouterr().out.lower()
    with pytest.raises(SystemExit):
        bench_memory.main(["--pool-mib", "0"])
    with pytest.raises(SystemExit):
        bench_memory.main(["--slot-tokens", "1000"])  # smaller than the mix's largest length
