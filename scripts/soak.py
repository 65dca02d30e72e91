#!/usr/bin/env python3
"""Soak: thousands of mixed requests with injected faults against a real tritonserver, then the bill.

    scripts/soak.py                                  # 3000 requests or 15 minutes, faults on, kills every 60 s
    scripts/soak.py --requests 400 --duration 90 --kill-every 40 --json soak.json     # what CI runs (shorter)

It starts its own server (mm_triton.launcher.TritonServer + the stub watchdog, see backends/mm_triton/watchdog.py)
on 127.0.0.1 only, with small pools, short timeouts and the shared secret on, and sends requests from
``--concurrency`` threads over gRPC and HTTP:

  normal      1-3 images: ordinary JPEG photos and synthetic ones of 64-1200 tokens (some repeated, for the
              embedding cache), a few prompts and MAX_TOKENS values; every answer must equal the first
              answer seen for the same input
  cancel      gRPC request cancelled by the client after 0-300 ms
  timeout     gRPC request with a 50-300 ms deadline
  bad_input   a hostile input (corrupt/bomb/non-image bytes, bad MAX_TOKENS, reserved tokens, missing or
              mistyped inputs, forged or malformed EMBED_REFs sent to mm_language)
  direct      a client calling an internal model (mm_encoder with a large image, mm_language with 16 refs to
              a stranger's address) without the server's internal token: must be refused, allocating nothing
  kill        every --kill-every seconds a random stub (of --kill-models) gets SIGKILL or SIGSTOP; the watchdog
              reloads the model; requests failing within the kill window are expected casualties

At the end it waits for quiescence and reports: requests served, failures by cause (each marked expected or
not), blocks leaked (the sum of mm_pool_blocks_used over every instance, which must be 0), stub restarts,
and memory growth (RSS of tritonserver + its stubs, mean of the first vs the last quarter of the run), as a
table and as JSON. Exit status 0 only when nothing leaked, no failure was unexpected, no answer was wrong and
memory grew less than --max-rss-growth-mib.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for sub in ("backends", "benchmarks", "client"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

KINDS = ("normal", "cancel", "timeout", "bad_input", "direct")
DEFAULT_MIX = {"normal": 0.72, "cancel": 0.08, "timeout": 0.07, "bad_input": 0.10, "direct": 0.03}
SERVER_ENV = {
    "MM_POOL_BLOCKS": "64",
    "MM_MAX_EMBED_TOKENS": "4096",
    "MM_CACHE_BLOCKS": "16",
    "MM_DEFAULT_WINDOW_TOKENS": "256",
    "MM_TTL_S": "8",
    "MM_PULL_TIMEOUT_S": "5",
    "MM_PULL_WAIT_S": "2",
    "MM_ALLOC_TIMEOUT_S": "3",
    "MM_LOG_LEVEL": "WARNING",
}
PROMPTS = [b"Describe the image.", b"What is in the pictures?", b"Count the colours."]
# failure causes, from the server's message
CAUSES = [
    ("cancelled", r"CANCELLED|[Cc]ancelled"),
    ("deadline", r"DEADLINE_EXCEEDED|[Dd]eadline [Ee]xceeded|timed out"),
    ("internal_refused", r"is an internal model"),
    ("stub_dead", r"is not healthy|\(stub_died\)"),
    (
        "model_reloading",
        r"[Uu]nknown model|not ready|is not found|unavailable: model|Request for unknown|"
        r"model_reloading",
    ),
    ("pool_exhausted", r"pool_exhausted|exhausted"),
    ("expired", r"\(expired\)|reclaimed: not pulled"),
    ("not_found", r"\(not_found\)|unknown transfer id"),
    ("pull_timeout", r"unavailable \(timeout\)|no answer from the sender"),
    ("invalid_input", r"INVALID_ARG|invalid input|\[400\]|unexpected shape|data-type|expects|is required"),
    ("connection", r"Socket closed|failed to connect|Connection reset|Broken pipe|RemoteDisconnected|EOF|UNAVAILABLE"),
]
# which causes each kind of request may end with, besides "ok" (kill windows allow more, see below)
# (pool_exhausted and expired are backpressure: the pools or the language queue were full for longer than
# alloc_timeout_s / ttl_s; both are clear UNAVAILABLE answers by design; a forged EMBED_REF may point at an
# encoder that was restarted since, and then times out after pull_timeout_s, as designed)
EXPECTED = {
    "normal": {"pool_exhausted", "expired"},
    "cancel": {"cancelled", "pool_exhausted", "expired"},
    "timeout": {"deadline", "pool_exhausted", "expired"},
    "bad_input": {"invalid_input", "internal_refused", "not_found", "pull_timeout"},
    "direct": {"internal_refused"},
}
# The pipelines stay loaded while an internal model reloads and answer UNAVAILABLE at once: a client that
# retried without pausing would make thousands of requests per kill window
RETRY_LATER = {"model_reloading", "stub_dead", "connection"}
RETRY_BACKOFF_S = 0.5
IN_KILL_WINDOW = {
    "stub_dead",
    "model_reloading",
    "pull_timeout",
    "not_found",
    "expired",
    "connection",
    "deadline",
    "pool_exhausted",
}


@dataclass
class Outcome:
    kind: str
    cause: str  # "ok", "wrong_output" or a failure cause
    seconds: float
    started: float  # seconds since the start of the run
    expected: bool = True
    detail: str = ""


@dataclass
class Options:
    requests: int = 3000
    duration_s: float = 900.0
    concurrency: int = 8
    seed: int = 1
    kill_every_s: float = 60.0  # 0: no kills
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_rss_growth_mib: float = 256.0
    log_file: str | None = None
    quiesce_timeout_s: float = 60.0
    kill_models: tuple[str, ...] = ("mm_encoder", "mm_language")  # the stubs the killer picks from


def register_stub_region(rs) -> str:
    """Try to register a live stub's /dev/shm region through Triton's system shared-memory API (it once let a
    client write into it and kill the stub): "internal_refused" when refused (403), else "accepted_shm"."""
    import urllib.error
    import urllib.request

    from mm_triton.watchdog import list_stubs

    region = next((s.shm_region for s in list_stubs(rs.server.pid).values() if s.shm_region), "none")
    body = json.dumps({"key": "/" + region, "offset": 0, "byte_size": 4096}).encode()
    req = urllib.request.Request(
        f"http://{rs.http_address}/v2/systemsharedmemory/region/hostile/register",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10):
            return "accepted_shm"
    except urllib.error.HTTPError as exc:
        return "internal_refused" if exc.code == 403 else f"shm_http_{exc.code}"
    except OSError:
        return "connection"


def classify(text: str) -> str:
    for cause, pattern in CAUSES:
        if re.search(pattern, text):
            return cause
    return "other"


class Corpus:
    """Deterministic images, photos among them: a hot set (repeated, for the cache) and a larger cold set."""

    def __init__(self, rnd: random.Random) -> None:
        from mm_bench.images import make_test_image
        from mm_client.demo import PHOTO_SIZES, demo_image

        # ordinary photos (resized by the server to its budget: 4096 tokens each on the tiny model) and small
        # synthetic images (many requests per second, embeddings of every length below the window and across it)
        photos = [size for size in PHOTO_SIZES if size[0] * size[1] <= 2_000_000]
        sizes = [64, 256, 600, 1200]
        self.hot = [make_test_image(tokens=sizes[i % 4], seed=1000 + i) for i in range(4)]
        self.cold = [
            demo_image(*rnd.choice(photos), seed=2000 + i)
            if i % 8 == 0
            else make_test_image(tokens=rnd.choice(sizes), seed=2000 + i)
            for i in range(24)
        ]
        # normal requests repeat these 40 inputs (1-3 images, some shared), so every answer can be compared
        # with the first answer to the same input: a block reused under a reader would show as a difference
        self.templates = [(tuple(self.pick(rnd)), rnd.choice(PROMPTS), rnd.choice([2, 4])) for _ in range(40)]

    def pick(self, rnd: random.Random) -> list[bytes]:
        n = rnd.choice([1, 1, 1, 2, 2, 3])
        return [rnd.choice(self.hot) if rnd.random() < 0.4 else rnd.choice(self.cold) for _ in range(n)]


FORGED_REF = "forged EMBED_REF at the current encoder address"


def bad_inputs(corpus: Corpus):
    """(model, inputs) pairs of hostile requests; all must be refused clearly (INVALID_ARG, or not_found)."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    def png_header(w: int, h: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b"")
        )

    good = corpus.hot[0]
    obj = np.object_

    def pipe(images, prompt=b"Describe", max_tokens=4, **override):
        inputs = {
            "IMAGE": np.array(images, dtype=obj).reshape(len(images)),
            "PROMPT": np.array([prompt], dtype=obj),
            "MAX_TOKENS": np.array([max_tokens], dtype=np.int32),
        }
        inputs.update(override)
        return "mm_pipeline", {k: v for k, v in inputs.items() if v is not None}

    def lang(ref: bytes):
        return "mm_language", {"EMBED_REF": np.array([ref], dtype=obj), "PROMPT": np.array([b"x"], dtype=obj)}

    buf = io.BytesIO()
    Image.new("RGB", (1, 1000)).save(buf, "PNG")
    return [
        pipe([good[: len(good) // 2]]),
        pipe([png_header(30000, 30000)]),
        pipe([b"not an image at all"]),
        pipe([b""]),
        pipe([buf.getvalue()]),
        pipe([good], max_tokens=0),
        pipe([good], max_tokens=-5),
        pipe([good], max_tokens=5000),
        pipe([good], prompt=b"<|image_pad|>"),
        pipe([good], prompt=b"  "),
        pipe([good], prompt=b"\xff\xfe"),
        pipe([good], PROMPT=None),
        pipe([good] * 17),
        pipe([good], PROMPT=np.array([1.0], dtype=np.float32)),
        (FORGED_REF, None),
        (FORGED_REF, None),
        lang(b"{not json"),
        lang(b'{"transfer_id": "x"}'),
    ]


class Soak:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.rnd = random.Random(opts.seed)
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.answers: dict[tuple, list[int]] = {}
        self.kills: list[dict] = []
        self.rss: list[tuple[float, int]] = []
        self.t0 = 0.0
        self.stop = threading.Event()
        self.issued = 0
        self.encoder_address = ""

    # ---- workers -------------------------------------------------------------------------------------
    def _next_kind(self, rnd: random.Random) -> str | None:
        with self.lock:
            if self.issued >= self.opts.requests or time.monotonic() - self.t0 > self.opts.duration_s:
                return None
            self.issued += 1
        kinds, weights = zip(*self.opts.mix.items())
        return rnd.choices(kinds, weights)[0]

    def _worker(self, index: int, rs, corpus: Corpus, bad: list) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        from mm_bench.reliable import error_text

        rnd = random.Random(self.opts.seed * 1000 + index)
        grpc = grpcclient.InferenceServerClient(rs.grpc_url)
        http = httpclient.InferenceServerClient(rs.http_address, network_timeout=120, connection_timeout=30)
        send = {
            "normal": self._send_normal,
            "cancel": self._send_cancel,
            "timeout": self._send_timeout,
            "bad_input": self._send_bad_input,
            "direct": self._send_direct,
        }
        self.rs = rs
        while not self.stop.is_set():
            kind = self._next_kind(rnd)
            if kind is None:
                break
            start = time.monotonic()
            try:
                cause, detail = send[kind](grpc, http, rnd, corpus, bad)
            except InferenceServerException as exc:
                detail = error_text(exc)[:300]
                cause = classify(detail)
            except Exception as exc:  # noqa: BLE001 - anything else is reported, not fatal
                detail = f"{type(exc).__name__}: {exc}"[:300]
                cause = classify(detail)
            self._record(Outcome(kind, cause, time.monotonic() - start, start - self.t0, detail=detail))
            if cause in RETRY_LATER:  # as a client should: back off while a model reloads
                time.sleep(RETRY_BACKOFF_S)
        grpc.close()
        http.close()

    # Each sender makes one request of its kind and returns (cause, detail); a server error raises.
    def _send_normal(self, grpc, http, rnd: random.Random, corpus: Corpus, bad: list) -> tuple[str, str]:
        import numpy as np
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        from mm_bench.reliable import tensors

        images, prompt, mt = rnd.choice(corpus.templates)
        inputs = {
            "IMAGE": np.array(images, dtype=np.object_),
            "PROMPT": np.array([prompt], dtype=np.object_),
            "MAX_TOKENS": np.array([mt], dtype=np.int32),
        }
        if rnd.random() < 0.5:
            out = grpc.infer("mm_pipeline", tensors(grpcclient, inputs), client_timeout=120)
        else:
            out = http.infer("mm_pipeline", tensors(httpclient, inputs))
        tokens = out.as_numpy("TOKEN_IDS").tolist()
        with self.lock:
            first = self.answers.setdefault((images, prompt, mt), tokens)
        return ("wrong_output", f"{tokens} != {first}") if tokens != first else ("ok", "")

    def _send_cancel(self, grpc, http, rnd: random.Random, corpus: Corpus, bad: list) -> tuple[str, str]:
        import numpy as np
        import tritonclient.grpc as grpcclient

        from mm_bench.reliable import tensors

        inputs = {
            "IMAGE": np.array(corpus.pick(rnd), dtype=np.object_),
            "PROMPT": np.array([PROMPTS[0]], dtype=np.object_),
        }
        done = threading.Event()
        box: list = []

        def on_done(result, error) -> None:
            box.append(error)
            done.set()

        ctx = grpc.async_infer("mm_pipeline", tensors(grpcclient, inputs), callback=on_done)
        time.sleep(rnd.uniform(0, 0.3))
        ctx.cancel()
        done.wait(0.5)  # tritonclient does not always call back after a cancel
        error = box[0] if box else None
        if error is not None and "ancel" not in str(error):
            return classify(str(error)), str(error)[:300]
        return ("ok" if box and error is None else "cancelled"), ""

    def _send_timeout(self, grpc, http, rnd: random.Random, corpus: Corpus, bad: list) -> tuple[str, str]:
        import numpy as np
        import tritonclient.grpc as grpcclient

        from mm_bench.reliable import tensors

        inputs = {
            "IMAGE": np.array(corpus.pick(rnd), dtype=np.object_),
            "PROMPT": np.array([PROMPTS[1]], dtype=np.object_),
        }
        grpc.infer("mm_pipeline", tensors(grpcclient, inputs), client_timeout=rnd.uniform(0.05, 0.3))
        return "ok", ""

    def _send_bad_input(self, grpc, http, rnd: random.Random, corpus: Corpus, bad: list) -> tuple[str, str]:
        import numpy as np
        import tritonclient.grpc as grpcclient

        from mm_bench.reliable import tensors

        model, inputs = rnd.choice(bad)
        if model == FORGED_REF:  # a well-formed EMBED_REF with a guessed transfer id
            from mmtransfer import EmbedRef
            from mmtransfer.ref import new_transfer_id

            ref = EmbedRef(new_transfer_id(), self.encoder_address, 64).to_json().encode()
            model, inputs = (
                "mm_language",
                {"EMBED_REF": np.array([ref], dtype=np.object_), "PROMPT": np.array([b"x"], dtype=np.object_)},
            )
        grpc.infer(model, tensors(grpcclient, inputs), client_timeout=60)
        return "accepted_bad_input", model  # a hostile input must never succeed

    def _send_direct(self, grpc, http, rnd: random.Random, corpus: Corpus, bad: list) -> tuple[str, str]:
        """A client calling what only the pipelines may: a stub's /dev/shm region through the shared-memory API,
        mm_encoder with an image, or mm_language with 16 refs to a stranger. Raises InferenceServerException
        when refused (the expected outcome); returns the cause otherwise."""
        import numpy as np
        import tritonclient.grpc as grpcclient

        from mm_bench.reliable import tensors

        if rnd.random() < 0.2:
            return register_stub_region(self.rs), "systemsharedmemory register"
        if rnd.random() < 0.5:
            model, inputs = "mm_encoder", {"IMAGE": np.array(corpus.pick(rnd)[:1], dtype=np.object_)}
        else:
            from mmtransfer import EmbedRef
            from mmtransfer.ref import new_transfer_id

            refs = [EmbedRef(new_transfer_id(), "tcp://192.0.2.1:5555", 64).to_json().encode()] * 16
            model, inputs = (
                "mm_language",
                {"EMBED_REF": np.array(refs, dtype=np.object_), "PROMPT": np.array([b"x"], dtype=np.object_)},
            )
        grpc.infer(model, tensors(grpcclient, inputs), client_timeout=60)
        return "accepted_direct_call", model  # an internal model must never serve a client

    def _record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    # ---- faults and sampling --------------------------------------------------------------------------
    def _killer(self, rs) -> None:
        every = self.opts.kill_every_s
        if every <= 0:
            return
        rnd = random.Random(self.opts.seed + 7)
        while not self.stop.wait(every):
            if self.issued >= self.opts.requests:
                return
            model = rnd.choice(list(self.opts.kill_models))
            # a third of the faults are pauses (SIGSTOP, never resumed: a stall); the watchdog kills and reloads
            sig = signal.SIGSTOP if rnd.random() < 1 / 3 else signal.SIGKILL
            at = time.monotonic() - self.t0
            try:
                pid = rs.kill_stub(model, sig)
            except RuntimeError as exc:  # a model still reloading from the previous kill
                self.kills.append({"model": model, "at_s": round(at, 1), "skipped": str(exc)})
                continue
            try:
                waited = rs.wait_serving(180)
            except TimeoutError as exc:
                self.kills.append(
                    {"model": model, "pid": pid, "at_s": round(at, 1), "recovered": False, "error": str(exc)}
                )
                continue
            self.kills.append(
                {
                    "model": model,
                    "pid": pid,
                    "at_s": round(at, 1),
                    "signal": sig.name,
                    "back_after_s": round(time.monotonic() - self.t0 - at, 1),
                    "reload_s": round(rs.watchdog.restarts[-1].seconds, 1) if rs.watchdog.restarts else None,
                    "waited_s": round(waited, 1),
                }
            )

    def _sampler(self, rs) -> None:
        while not self.stop.wait(1.0):
            self.rss.append((time.monotonic() - self.t0, rs.rss_bytes()))

    # ---- the run -------------------------------------------------------------------------------------
    def run(self) -> dict:
        from mm_bench.reliable import ReliableServer

        env = {**SERVER_ENV, "MM_SHARED_SECRET": secrets.token_hex(16)}
        corpus = Corpus(self.rnd)
        with ReliableServer(env=env, log_file=self.opts.log_file) as rs:
            for url in (rs.http_address, rs.grpc_url, rs.metrics_url):
                assert "127.0.0.1" in url, f"soak talks to loopback only, got {url}"
            import numpy as np
            import tritonclient.grpc as grpcclient

            from mm_bench.internal import with_token
            from mm_bench.reliable import tensors

            ref = grpcclient.InferenceServerClient(rs.grpc_url).infer(  # white-box: the encoder's address
                "mm_encoder",
                tensors(
                    grpcclient, with_token(rs, "mm_encoder", {"IMAGE": np.array([corpus.hot[0]], dtype=np.object_)})
                ),
            )
            self.encoder_address = json.loads(ref.as_numpy("EMBED_REF")[0])["address"]
            assert self.encoder_address.startswith("tcp://127.0.0.1:"), self.encoder_address
            bad = bad_inputs(corpus)
            start_stubs = rs.stubs()
            self.t0 = time.monotonic()
            threads = [
                threading.Thread(target=self._worker, args=(i, rs, corpus, bad), daemon=True)
                for i in range(self.opts.concurrency)
            ]
            helpers = [
                threading.Thread(target=self._killer, args=(rs,), daemon=True),
                threading.Thread(target=self._sampler, args=(rs,), daemon=True),
            ]
            for t in threads + helpers:
                t.start()
            for t in threads:
                t.join(self.opts.duration_s + 600)
            hung = sum(t.is_alive() for t in threads)
            run_s = time.monotonic() - self.t0
            self.stop.set()
            for t in helpers:
                t.join(300)
            # quiescence: every published embedding pulled, aborted or reclaimed
            rs.wait_serving(180)
            held = rs.wait_pools_empty(self.opts.quiesce_timeout_s)
            leaked = int(sum(held.values()))
            pools = rs.pools_used()
            metrics = rs.server.metrics()
            stubs_end = rs.stubs()
            restarts = [asdict(r) for r in rs.watchdog.restarts]
        return self._report(run_s, hung, leaked, pools, metrics, start_stubs, stubs_end, restarts)

    def _mark_expected(self) -> None:
        """A failure is expected for its kind of request, or inside a kill's window for the causes a kill brings."""
        windows = [(k["at_s"], k["at_s"] + k.get("back_after_s", 60) + 5) for k in self.kills if "pid" in k]
        for o in self.outcomes:
            if o.cause == "ok":
                continue
            in_window = any(a - 0.5 <= o.started + o.seconds and o.started <= b for a, b in windows)
            o.expected = o.cause in EXPECTED[o.kind] or (in_window and o.cause in IN_KILL_WINDOW)

    def _rss_summary(self) -> dict:
        rss = self.rss
        quarter = max(1, len(rss) // 4)
        first = statistics.mean(v for _, v in rss[:quarter]) if rss else 0
        last = statistics.mean(v for _, v in rss[-quarter:]) if rss else 0
        return {
            "first_quarter": round(first / 2**20, 1),
            "last_quarter": round(last / 2**20, 1),
            "growth": round((last - first) / 2**20, 1),
            "samples": len(rss),
            "max": round(max((v for _, v in rss), default=0) / 2**20, 1),
        }

    def _report(self, run_s, hung, leaked, pools, metrics, start_stubs, stubs_end, restarts) -> dict:
        from mm_triton.prometheus import metric_value

        self._mark_expected()
        by_kind = {k: Counter(o.cause for o in self.outcomes if o.kind == k) for k in KINDS}
        unexpected = [asdict(o) for o in self.outcomes if not o.expected]
        ok_lat = sorted(o.seconds for o in self.outcomes if o.cause == "ok" and o.kind == "normal")
        report = {
            "options": {**asdict(self.opts)},
            "machine": {"cpus": os.cpu_count(), "gpu": False},
            "run_s": round(run_s, 1),
            "requests": len(self.outcomes),
            "served": sum(o.cause == "ok" for o in self.outcomes),
            "by_kind": {k: dict(v) for k, v in by_kind.items()},
            "failures_by_cause": dict(Counter(o.cause for o in self.outcomes if o.cause != "ok")),
            "unexpected": len(unexpected),
            "unexpected_examples": unexpected[:10],
            "wrong_outputs": sum(o.cause == "wrong_output" for o in self.outcomes),
            "distinct_inputs_checked": len(self.answers),
            "hung_workers": hung,
            "blocks_leaked": leaked,
            "pools_after": pools,
            "kills": self.kills,
            "watchdog_restarts": restarts,
            "stubs_unexpectedly_changed": (stubs_end != start_stubs) and not self.kills,
            "latency_ok_s": {
                "p50": round(ok_lat[len(ok_lat) // 2], 3) if ok_lat else None,
                "p95": round(ok_lat[int(len(ok_lat) * 0.95)], 3) if ok_lat else None,
            },
            "throughput_rps": round(len(self.outcomes) / run_s, 2) if run_s else 0,
            "rss_mib": self._rss_summary(),
            "server_metrics": {
                "transfers": metric_value(metrics, "mm_transfers_total", 0.0),
                "continuations": metric_value(metrics, "mm_transfer_continuations_total", 0.0),
                "cache_hits": metric_value(metrics, "mm_embedding_cache_hits_total", 0.0),
                "failures": failures_by_model_and_cause(metrics),
            },
        }
        report["passed"] = (
            leaked == 0
            and not unexpected
            and report["wrong_outputs"] == 0
            and hung == 0
            and report["rss_mib"]["growth"] < self.opts.max_rss_growth_mib
            and all(k.get("recovered", True) for k in self.kills)
        )
        return report


def failures_by_model_and_cause(metrics: dict) -> dict[str, float]:
    """mm_transfer_failures_total summed per 'model/cause' (non-zero series only)."""
    out: dict[str, float] = {}
    for (name, labels), value in metrics.items():
        if name == "mm_transfer_failures_total" and value:
            d = dict(labels)
            key = f"{d.get('model')}/{d.get('cause')}"
            out[key] = out.get(key, 0) + value
    return out


def format_table(r: dict) -> str:
    lines = [
        f"soak: {r['requests']} requests in {r['run_s']}s ({r['throughput_rps']}/s) on {r['machine']['cpus']} CPU(s), "
        f"no GPU; {r['options']['concurrency']} clients",
        "",
        f"{'kind':<11}{'sent':>7}{'ok':>7}  failures (cause: count)",
    ]
    for kind, causes in r["by_kind"].items():
        sent = sum(causes.values())
        fails = ", ".join(f"{c}: {n}" for c, n in sorted(causes.items()) if c != "ok")
        lines.append(f"{kind:<11}{sent:>7}{causes.get('ok', 0):>7}  {fails or '-'}")
    lines += [
        "",
        f"served                {r['served']}/{r['requests']}   (wrong answers: {r['wrong_outputs']}, "
        f"distinct inputs checked: {r['distinct_inputs_checked']})",
        f"unexpected failures   {r['unexpected']}",
        f"blocks leaked         {r['blocks_leaked']}   (sum of mm_pool_blocks_used after quiescence)",
        f"stub kills            {len([k for k in r['kills'] if 'pid' in k])}   "
        + ", ".join(f"{k['model']}@{k['at_s']}s back after {k.get('back_after_s')}s" for k in r["kills"] if "pid" in k),
        f"RSS server+stubs      {r['rss_mib']['first_quarter']} -> {r['rss_mib']['last_quarter']} MiB "
        f"(growth {r['rss_mib']['growth']} MiB, max {r['rss_mib']['max']} MiB)",
        f"latency of ok normal  p50 {r['latency_ok_s']['p50']}s  p95 {r['latency_ok_s']['p95']}s",
        f"server counted        {int(r['server_metrics']['transfers'])} transfers, "
        f"{int(r['server_metrics']['continuations'])} continuations, "
        f"{int(r['server_metrics']['cache_hits'])} cache hits",
        f"result                {'PASS' if r['passed'] else 'FAIL'}",
    ]
    return "\n".join(lines)


def run_soak(opts: Options) -> dict:
    return Soak(opts).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=3000, help="stop after this many requests (default 3000)")
    p.add_argument("--duration", type=float, default=900.0, metavar="S", help="or after this many seconds (900)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--kill-every",
        type=float,
        default=60.0,
        metavar="S",
        help="SIGKILL a random stub this often (0: never; default 60)",
    )
    p.add_argument(
        "--kill-models",
        default="mm_encoder,mm_language",
        help="the stubs --kill-every picks from, comma-separated (default mm_encoder,mm_language)",
    )
    p.add_argument("--no-faults", action="store_true", help="normal requests only (a baseline)")
    p.add_argument("--max-rss-growth-mib", type=float, default=256.0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the report here too")
    p.add_argument("--log-file", type=Path, default=ROOT / ".cache" / "logs" / "soak-server.log")
    args = p.parse_args(argv)
    mix = {"normal": 1.0} if args.no_faults else dict(DEFAULT_MIX)
    opts = Options(
        args.requests,
        args.duration,
        args.concurrency,
        args.seed,
        0.0 if args.no_faults else args.kill_every,
        mix,
        args.max_rss_growth_mib,
        str(args.log_file),
        kill_models=tuple(m for m in args.kill_models.split(",") if m),
    )
    args.log_file.parent.mkdir(parents=True, exist_ok=True)
    report = run_soak(opts)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
