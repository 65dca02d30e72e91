"""The short soak (45 s of load, about 70 s in all): scripts/soak.py with a few hundred mixed requests, client
cancels, deadlines, hostile inputs, abandoned embeddings and two stub kills (at 15 s and 30 s) against a real
tritonserver on 127.0.0.1.
The long run is `scripts/soak.py` itself (docs/RELIABILITY.md has its figures)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from harness import REPO_ROOT

pytestmark = pytest.mark.integration


def _soak_module():
    spec = importlib.util.spec_from_file_location("mm_soak", REPO_ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mm_soak"] = module
    spec.loader.exec_module(module)
    return module


def test_short_soak_loses_nothing(tiny_model_dir):
    from conftest import LOG_DIR

    soak = _soak_module()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    opts = soak.Options(
        requests=100_000,
        duration_s=45,
        concurrency=6,
        seed=7,
        kill_every_s=15,
        # Only mm_language's stub: killing the batching encoder's stub can make tritonserver 2.51 itself abort
        # (boost::interprocess::lock_exception; scripts/serve restarts it, the soak's server does not), which
        # test_faults.py tracks as a known risk (xfail). This soak is about what the product survives.
        kill_models=("mm_language",),
        max_rss_growth_mib=256,
        log_file=str(LOG_DIR / "test_soak-server.log"),
    )
    report = soak.run_soak(opts)
    print(soak.format_table(report))
    (LOG_DIR / "test_soak-report.json").write_text(json.dumps(report, indent=2, default=str))
    assert report["hung_workers"] == 0
    assert report["blocks_leaked"] == 0, report["pools_after"]
    assert report["unexpected"] == 0, report["unexpected_examples"]
    assert report["wrong_outputs"] == 0
    assert report["rss_mib"]["growth"] < 256, report["rss_mib"]
    assert report["requests"] >= 150 and report["served"] >= report["requests"] // 3
    kills = [k for k in report["kills"] if "pid" in k]
    assert kills and all(k.get("recovered", True) for k in kills), report["kills"]
    assert all(r["ok"] for r in report["watchdog_restarts"])
    for kind in ("normal", "cancel", "timeout", "bad_input"):
        assert sum(report["by_kind"][kind].values()) > 0, f"no {kind} request was sent"
    assert report["passed"]
