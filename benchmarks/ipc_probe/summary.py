"""Served / in-process ratios of bench_engine.py JSON files: req/s, ITL p50, and the engine's decode time per
step (the decode phase's mean / (MAX_TOKENS - 1)): summary.py RUN.json ... (markdown rows)."""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    out = {}
    for r in json.load(open(path))["rows"]:
        if not r.get("rps"):
            continue  # a point that failed
        phases = r.get("phases") or {}
        engine = phases.get("inprocess") or phases.get("mm_language_stream") or {}
        decode = engine.get("decode", {}).get("mean_ms")
        step = decode / (r["max_tokens"] - 1) if decode else float("nan")
        out[(r["target"], r["max_tokens"], r["load"])] = (r["rps"], r["itl_p50_ms"], step)
    return out


def main() -> None:
    print("| run | MAX_TOKENS | load | req/s in-process / served | ITL p50 ms | decode ms/step (served/in-process) |")
    print("|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        rows = load(path)
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        for (target, mt, load_), ip in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            served = rows.get(("mm_pipeline", mt, load_))
            if target != "inprocess" or served is None:
                continue
            print(
                f"| {name} | {mt} | {load_} | {ip[0]:.2f} / {served[0]:.2f} | {ip[1]:.2f} / {served[1]:.2f} "
                f"| {ip[2]:.2f} / {served[2]:.2f} ({served[2] / ip[2]:.2f}x) |"
            )


if __name__ == "__main__":
    main()
