"""Scale-out on GPUs (issue 7): encoder and language instances spread over 2 GPUs, started with the real
command (``scripts/serve.py``), the correctness oracle through them, and every pool back to 0.

Layouts (each a module-scoped set of servers):

* ``split``: three tritonserver processes. An encoder server ``--role encoder --encoder-gpus 0`` and two
  language servers sharing it, ``--role language --language-gpus 1`` (the embedding crosses GPUs: NCCL) and
  ``--role language --language-gpus 0`` (same GPU, another process: CUDA IPC).
* ``one-server-2x2``: one server ``--role all --encoder-gpus 0,1 --language-gpus 1,0`` (one instance per
  listed GPU: 2 encoder x 2 language instances, every (encoder, language) pair its own channel: GPU 0 -> 1
  and 1 -> 0 over NCCL, 0 -> 0 and 1 -> 1 over CUDA IPC).

The oracle: greedy TOKEN_IDS == ``MonolithicModel``'s on a GPU that holds a language instance (or on the CPU:
the tiny random model is the same there for these images; a mismatch against all of them fails). The
continuations counted by mm_language equal ceil(tokens / 1024) - 1 per image.

Needs 2 GPUs, the Triton bundle, tritonclient.grpc (the language server's mm_pipeline calls the encoder
server over gRPC) and the tiny checkpoint; scripts/device/gpu_suite.sh provides them (stage ``scaleout``).
"""

from __future__ import annotations

import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from harness import metric_value

from ._http import infer
from ._serve import Served

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in NCCL_ENV.items():
    os.environ.setdefault(_k, _v)
PROMPT = "Describe the image."
MAX_TOKENS = 6
WINDOW = 1024
IMAGES = {"small": (96, 41), "one_cont": (1500, 42), "two_cont": (2500, 43), "three_cont": (4000, 44)}
MIX = [
    "small",
    "three_cont",
    "one_cont",
    "small",
    "two_cont",
    "one_cont",
    "small",
    "two_cont",
    "three_cont",
    "small",
    "one_cont",
    "small",
] * 2  # 24 concurrent requests


class Layout:
    def __init__(
        self,
        name: str,
        servers: list[Served],
        entries: list[Served],
        languages: list[Served],
        language_gpus: list[int],
        transports: set[str],
    ) -> None:
        self.name, self.servers, self.entries, self.languages = name, servers, entries, languages
        self.language_gpus, self.transports = language_gpus, transports


LAYOUTS = ("split", "one-server-2x2")


@pytest.fixture(scope="module")
def images(tiny_model_dir):
    from mm_bench.images import make_test_image

    return {n: make_test_image(tokens=t, seed=s, model_dir=tiny_model_dir) for n, (t, s) in IMAGES.items()}


@pytest.fixture(scope="module")
def image_tokens(images, tiny_model_dir):
    import io

    from PIL import Image

    from mm_bench.images import tokens_for_image_size

    return {n: tokens_for_image_size(tiny_model_dir, *Image.open(io.BytesIO(b)).size) for n, b in images.items()}


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    """Greedy tokens of the monolithic model on each GPU and on the CPU (loaded lazily)."""
    from mm_models.images import decode_image
    from mm_models.qwen2vl import MonolithicModel

    models: dict[str, object] = {}
    cache: dict = {}

    def expected(image_bytes: list[bytes], device: str) -> list[int]:
        key = (tuple(image_bytes), device)
        if key not in cache:
            if device not in models:
                models[device] = MonolithicModel.from_pretrained(tiny_model_dir, device=device)
            pil = [decode_image(b, 64_000_000) for b in image_bytes]
            cache[key] = list(models[device].generate(pil, PROMPT, MAX_TOKENS))
        return cache[key]

    return expected


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, tiny_model_dir, tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    log_dir = Path(os.environ.get("MM_GPU_LOG_DIR", tmp_path_factory.getbasetemp()))
    env = {"MM_LOG_LEVEL": "INFO", **NCCL_ENV}
    common = ["--checkpoint", str(tiny_model_dir)]
    started: list[Served] = []
    t0 = time.monotonic()
    try:
        if request.param == "split":
            enc = Served("split-encoder-gpu0", ["--role", "encoder", "--encoder-gpus", "0", *common], log_dir, env)
            started.append(enc)
            for gpu in (1, 0):
                started.append(
                    Served(
                        f"split-language-gpu{gpu}",
                        ["--role", "language", "--language-gpus", str(gpu), "--encoder-url", enc.grpc_url, *common],
                        log_dir,
                        env,
                    )
                )
            lay = Layout("split", started, started[1:], started[1:], [1, 0], {"nccl", "cuda_ipc"})
        else:
            one = Served(
                "one-server-2x2",
                ["--role", "all", "--encoder-gpus", "0,1", "--language-gpus", "1,0", *common],
                log_dir,
                env,
            )
            started.append(one)
            lay = Layout("one-server-2x2", started, [one], [one], [1, 0], {"nccl", "cuda_ipc"})
        print(
            f"{request.param}: servers up in {time.monotonic() - t0:.1f} s "
            f"({', '.join(f'{s.name} {s.startup_s:.1f} s' for s in started)})"
        )
        yield lay
        for s in started:
            assert _pools_empty(s), f"{s}: mm_pool_blocks_used not back to 0 at the end"
    finally:
        codes = [s.stop() for s in reversed(started)]
    assert codes == [0] * len(started), f"scripts/serve exit codes {codes}"


def _pools_empty(server: Served, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while metric_value(server.metrics(), "mm_pool_blocks_used", 0.0) != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def clean(layout):
    yield layout
    for s in layout.servers:
        assert _pools_empty(s), f"{s}: mm_pool_blocks_used did not return to 0 after the test"


def _generate(server: Served, image_list: list[bytes]) -> list[int]:
    out = infer(
        server.http_address,
        "mm_pipeline",
        {"IMAGE": image_list, "PROMPT": [PROMPT.encode()]},
        {"MAX_TOKENS": [MAX_TOKENS]},
        outputs=["TEXT", "TOKEN_IDS"],
    )
    return [int(x) for x in out["TOKEN_IDS"]]


def _check(got: list[int], image_list: list[bytes], oracle, layout: Layout, what: str) -> None:
    devices = [f"cuda:{g}" for g in layout.language_gpus]
    for device in devices:
        if got == oracle(image_list, device):
            return
    cpu = oracle(image_list, "cpu")
    assert got == cpu, (
        f"{what}: {got} != the monolithic model's on {devices} ({oracle(image_list, devices[0])}) or CPU ({cpu})"
    )


def _per_instance(metrics, name: str, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in metrics.items():
        d = dict(labels)
        if n == name and d.get("model") == model:
            out[d.get("instance", "")] = out.get(d.get("instance", ""), 0.0) + v
    return out


@pytest.mark.parametrize("name", list(IMAGES))
def test_oracle(clean, images, image_tokens, oracle, name):
    for server in clean.entries:
        before = metric_value(server.metrics(), "mm_transfer_continuations_total", 0.0, model="mm_language")
        got = _generate(server, [images[name]])
        assert len(got) == MAX_TOKENS
        _check(got, [images[name]], oracle, clean, f"{server.name} {name}")
        conts = metric_value(server.metrics(), "mm_transfer_continuations_total", 0.0, model="mm_language") - before
        assert conts == math.ceil(image_tokens[name] / WINDOW) - 1, f"{server.name} {name}: {conts} continuations"


def test_several_images_in_prompt_order(clean, images, oracle):
    order = [images["one_cont"], images["small"], images["two_cont"]]
    for server in clean.entries:
        _check(_generate(server, order), order, oracle, clean, f"{server.name} 3 images")
        _check(_generate(server, order[::-1]), order[::-1], oracle, clean, f"{server.name} 3 images reversed")


def test_concurrent_requests_spread_over_instances(clean, images, oracle):
    entries = clean.entries
    before = [_per_instance(s.metrics(), "mm_transfers_total", "mm_language") for s in clean.languages]

    def one(i):
        return _generate(entries[i % len(entries)], [images[MIX[i]]])

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(MIX)) as pool:
        results = list(pool.map(one, range(len(MIX))))
    print(f"{clean.name}: {len(MIX)} concurrent requests in {time.monotonic() - t0:.2f} s")
    for i, (name, got) in enumerate(zip(MIX, results)):
        _check(got, [images[name]], oracle, clean, f"request {i} ({name})")
    after = [_per_instance(s.metrics(), "mm_transfers_total", "mm_language") for s in clean.languages]
    lang = {f"{s.name}/{k}": v - b.get(k, 0.0) for s, b, a in zip(clean.languages, before, after) for k, v in a.items()}
    print("transfers per language instance:", lang)
    assert sum(lang.values()) == len(MIX)
    if clean.name == "one-server-2x2":
        assert len(lang) == 2 and all(v > 0 for v in lang.values()), lang
        m = clean.servers[0].metrics()
        enc = _per_instance(m, "mm_images_encoded_total", "mm_encoder")
        hits = _per_instance(m, "mm_embedding_cache_hits_total", "mm_encoder")
        served = {k: enc.get(k, 0.0) + hits.get(k, 0.0) for k in set(enc) | set(hits)}
        print("images encoded + cache hits per encoder instance:", served)
        assert len(served) == 2 and all(v > 0 for v in served.values()), served
    else:
        assert all(v > 0 for v in lang.values()), lang


def test_gpu_transports_carried_the_bytes(clean):
    """Every expected transport was used (the receiver logs '<transport> channel <id> to <address> open' and, for
    embeddings of several chunks, 'done over <transport>: N tokens')."""
    logs = "\n".join(s.log_text() for s in clean.languages)
    seen = set(re.findall(r"done over (\w+): \d+ tokens", logs)) | set(
        re.findall(r": (\w+) channel [0-9a-f]+ to \S+ open", logs)
    )
    print(f"{clean.name}: transports seen {sorted(seen)}")
    assert "host" not in seen, "an embedding went over the host transport between GPU instances"
    assert clean.transports <= seen, f"expected {sorted(clean.transports)}, saw {sorted(seen)}"
