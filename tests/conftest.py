"""Shared pytest set-up.

- Tests marked ``gpu`` are skipped when CUDA is not available (torch is imported only if such tests exist).
- ``tests/`` is importable: ``from harness import TritonServer, parse_metrics, metric_value``; so is
  ``benchmarks/`` (``mm_bench``: synthetic images, samplers, the reliable server), which is not installed.

Fixtures:
  repo_root           the repository root (Path)
  triton_server       factory: ``triton_server(repo=None, env=None, args=(), **kw) -> TritonServer`` (started);
                      every server it started is stopped at the end of the test, pass or fail
  tiny_model_dir      the tiny Qwen2-VL checkpoint built by scripts/setup (MM_TINY_MODEL)
  monolithic_tokens   the oracle: greedy tokens of the monolithic tiny model, cached per input
  mm_server           session-wide server of model_repository/ with the tiny model (MM_CHECKPOINT)
  mm_server_factory   factory like triton_server, defaulting to model_repository/ + tiny model, for tests
                      that need their own knobs (e.g. env={"MM_POOL_BLOCKS": "4"})
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
for _path in (TESTS_DIR, TESTS_DIR.parent / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from harness import DEFAULT_MODEL_REPOSITORY, REPO_ROOT, TritonServer  # noqa: E402

LOG_DIR = Path(os.environ.get("MM_CACHE", REPO_ROOT / ".cache")) / "logs" / "tests"


# ------------------------------------------------------------------------------------------ gpu skip
_cuda_available: bool | None = None


def cuda_available() -> bool:
    global _cuda_available
    if _cuda_available is None:
        try:
            import torch

            _cuda_available = bool(torch.cuda.is_available())
        except Exception:
            _cuda_available = False
    return _cuda_available


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA (no GPU here)")
        for item in gpu_items:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def _log_path(request, suffix: str = "") -> Path:
    name = request.node.nodeid.replace("/", "_").replace("::", "__")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-150:]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return LOG_DIR / f"{name}{suffix}.log"


@pytest.fixture
def triton_server(request):
    """Start servers for one test; all are stopped at its end whatever happens."""
    servers: list[TritonServer] = []

    def start(model_repository=None, env=None, args=(), **kw) -> TritonServer:
        kw.setdefault("log_file", _log_path(request, f"-{len(servers)}"))
        if kw["log_file"] and Path(kw["log_file"]).exists():
            Path(kw["log_file"]).unlink()
        server = TritonServer(model_repository, env=env, args=args, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    path = Path(os.environ.get("MM_TINY_MODEL", REPO_ROOT / ".cache" / "models" / "tiny-qwen2-vl"))
    if not path.is_dir():
        if importlib.util.find_spec("mm_models") is None or importlib.util.find_spec("mm_models.build_tiny") is None:
            pytest.skip("mm_models.build_tiny does not exist yet (no tiny model)")
        pytest.fail(f"tiny model missing at {path}: run scripts/setup")
    return path


def _require_pipeline_repo() -> None:
    if not (DEFAULT_MODEL_REPOSITORY / "mm_pipeline" / "config.pbtxt").is_file():
        pytest.skip("model_repository/mm_pipeline does not exist yet")


@pytest.fixture
def mm_server_factory(request, tiny_model_dir):
    servers: list[TritonServer] = []

    def start(env=None, args=(), model_repository=None, **kw) -> TritonServer:
        if model_repository is None:
            _require_pipeline_repo()
        full_env = {"MM_CHECKPOINT": str(tiny_model_dir), **(env or {})}
        kw.setdefault("log_file", _log_path(request, f"-{len(servers)}"))
        kw.setdefault("startup_timeout_s", 300)
        server = TritonServer(model_repository, env=full_env, args=args, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def mm_server(tiny_model_dir):
    _require_pipeline_repo()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    server = TritonServer(
        DEFAULT_MODEL_REPOSITORY,
        env={"MM_CHECKPOINT": str(tiny_model_dir)},
        log_file=LOG_DIR / "mm_server-session.log",
        startup_timeout_s=300,
    )
    if server.log_file.exists():
        server.log_file.unlink()
    with server:
        yield server


@pytest.fixture(scope="session")
def monolithic_tokens(tiny_model_dir):
    """The correctness oracle: ``monolithic_tokens(image_bytes, prompt, max_tokens)`` is the
    greedy token list of the monolithic tiny model in this process, computed once per input."""
    from mm_models.images import decode_image
    from mm_models.qwen2vl import MonolithicModel

    model = MonolithicModel.from_pretrained(tiny_model_dir)
    cache: dict = {}

    def expected(image_bytes, prompt: str, max_tokens: int) -> list[int]:
        key = (tuple(image_bytes), prompt, max_tokens)
        if key not in cache:
            cache[key] = model.generate([decode_image(b, 64_000_000) for b in image_bytes], prompt, max_tokens)
        return cache[key]

    return expected
