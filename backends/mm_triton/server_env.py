"""Where tritonserver and the Python backend are, and the environment they need.

Paths come from the same variables as scripts/env.sh (TRITONSERVER, MM_BACKEND_DIR, MM_CACHE), with the same
defaults computed here when the variables are not set. scripts/setup must have run (it installs the
nvidia-pytriton wheel and assembles the backend directory).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Mapping

#: The source tree this package runs from (the project is installed editable: backends/ is on sys.path).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"


class TritonStartError(RuntimeError):
    """tritonserver is missing, exited or did not become ready; the message ends with its log tail."""


def _site_packages() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed in this Python; run scripts/setup")
    return Path(list(spec.submodule_search_locations)[0]).parent


def find_tritonserver() -> Path:
    """$TRITONSERVER, else the binary inside the installed nvidia-pytriton wheel."""
    env = os.environ.get("TRITONSERVER")
    path = Path(env) if env else _site_packages() / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not os.access(path, os.X_OK):
        raise TritonStartError(f"tritonserver not found or not executable: {path} (run scripts/setup)")
    return path


def find_backend_dir() -> Path:
    """$MM_BACKEND_DIR, else <repo>/.cache/triton/backends (assembled by scripts/setup)."""
    env = os.environ.get("MM_BACKEND_DIR")
    cache = Path(os.environ.get("MM_CACHE", REPO_ROOT / ".cache"))
    path = Path(env) if env else cache / "triton" / "backends"
    stub = path / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"no Triton Python backend in {path} (missing {stub.name}); run scripts/setup")
    return path


def libpython_dir() -> Path | None:
    """The directory of this interpreter's own libpythonX.Y.so.1.0, if it is a shared build.

    The Python-backend stub embeds libpythonX.Y.so.1.0 but runs the venv's base interpreter's stdlib; a
    different CPython build of the same X.Y (e.g. Debian's 3.11.2 libpython under a pyenv 3.11.7 stdlib)
    fails with "undefined symbol: _PyModule_Add" as soon as a model imports ssl. Putting this directory on
    LD_LIBRARY_PATH makes the stub load the matching libpython (same rule as scripts/env.sh)."""
    import sysconfig

    name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    candidates = [sysconfig.get_config_var("LIBDIR"), str(Path(sys.base_prefix) / "lib")]
    for d in candidates:
        if d and (Path(d) / name).exists():
            if d.startswith(("/usr/lib", "/lib")):
                return None  # the system's own: found by default, don't reorder system libraries
            return Path(d)
    return None


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver needs: venv bin first on PATH (the Python stub finds its environment
    through `python3` on PATH; PYTHONPATH is not honoured) and the wheel's libraries on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    site = _site_packages()
    venv_bin = str(Path(sys.prefix) / "bin")

    def prepend(var: str, *dirs: str) -> None:
        parts = [p for p in env.get(var, "").split(":") if p and p not in dirs]
        env[var] = ":".join([*dirs, *parts])

    prepend("PATH", venv_bin)
    lib_dirs = [str(site / "nvidia_pytriton.libs")]
    libpython = libpython_dir()
    if libpython:
        lib_dirs.append(str(libpython))
    lib_dirs.append(str(site / "nvidia" / "cuda_runtime" / "lib"))
    prepend("LD_LIBRARY_PATH", *lib_dirs)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("PYTHONPATH", None)  # not honoured by the stub anyway; keep the server and stubs alike
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env
