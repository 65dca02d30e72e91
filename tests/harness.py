"""The test side of the server launcher: re-exports of the product's launcher (``mm_triton.launcher`` and
its helpers) under the names the tests use, and throwaway model repositories copied from tests/models/.

    from harness import TritonServer, parse_metrics, metric_value

    with TritonServer(model_repository, env={"MM_POOL_BLOCKS": "8"}) as server:
        ...
        metric_value(parse_metrics(server.metrics_text()), "nv_inference_request_success", model="mm_pipeline")

The launcher itself (free ports, log file, readiness, stopping the whole process group, never leaving a server
behind) is documented in backends/mm_triton/launcher.py. The product never imports this module.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mm_triton.launcher import TritonServer, TritonStartError
from mm_triton.ports import free_port, free_run, port_is_free
from mm_triton.processes import child_setup, kill_group
from mm_triton.procfs import group_members
from mm_triton.prometheus import metric_value, parse_metrics
from mm_triton.server_env import (
    DEFAULT_MODEL_REPOSITORY,
    REPO_ROOT,
    find_backend_dir,
    find_tritonserver,
    libpython_dir,
    server_env,
)

#: Python-backend models of the tests (real model folders: config.pbtxt + 1/model.py).
TEST_MODELS = Path(__file__).resolve().parent / "models"


__all__ = [
    "REPO_ROOT",
    "DEFAULT_MODEL_REPOSITORY",
    "TEST_MODELS",
    "TritonServer",
    "TritonStartError",
    "free_port",
    "free_run",
    "port_is_free",
    "find_tritonserver",
    "find_backend_dir",
    "server_env",
    "libpython_dir",
    "kill_group",
    "child_setup",
    "group_members",
    "parse_metrics",
    "metric_value",
    "write_python_model",
    "copy_model",
    "write_identity_repo",
    "write_fake_pipeline_repo",
]

_NAME_LINE = re.compile(r'^name: "[^"]*"', re.MULTILINE)


def write_python_model(repo: str | os.PathLike, name: str, config: str, model_py: str) -> Path:
    """Write <repo>/<name>/config.pbtxt and <repo>/<name>/1/model.py; return the repository path."""
    repo = Path(repo)
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(model_py)
    return repo


def copy_model(source: str | os.PathLike, repo: str | os.PathLike, name: str) -> Path:
    """Copy the model folder ``source`` into ``repo`` as model ``name`` (config.pbtxt's name rewritten)."""
    repo = Path(repo)
    target = repo / name
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / "config.pbtxt"
    config.write_text(_NAME_LINE.sub(f'name: "{name}"', config.read_text(), count=1))
    return repo


def write_identity_repo(repo: str | os.PathLike, name: str = "identity") -> Path:
    """tests/models/identity: INPUT0 (FP32 [-1]) -> OUTPUT0, TEXT_IN (BYTES, optional) -> TEXT_OUT,
    ENV = $HARNESS_ECHO_ENV, PYINFO = the stub's [sys.version, sys.prefix, numpy file];
    $HARNESS_FAIL_INIT makes initialize() fail. It imports ssl, so a libpython/stdlib mismatch shows."""
    return copy_model(TEST_MODELS / "identity", repo, name)


def write_fake_pipeline_repo(repo: str | os.PathLike, name: str = "mm_pipeline") -> Path:
    """tests/models/mm_pipeline_fake: the mm_pipeline contract (IMAGE, PROMPT, MAX_TOKENS -> TEXT, TOKEN_IDS)
    and no ML, for testing clients and scripts without the real models."""
    return copy_model(TEST_MODELS / "mm_pipeline_fake", repo, name)
