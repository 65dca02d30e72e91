# Source me (bash):  source scripts/env.sh
#
# The one place that says where things are. scripts/setup, serve, test, client and the test harness
# all use these variables, so a shell that sourced this file sees exactly what they see.
#
#   MM_ROOT         repository root
#   MM_VENV         the project's virtual environment (.venv)
#   MM_PYTHON       its python
#   MM_PY_VERSION   its X.Y version (picks the Triton Python-backend stub)
#   MM_SITE         its site-packages
#   MM_CACHE        generated, machine-local files (.cache/, git-ignored)
#   TRITONSERVER    the tritonserver 2.51 binary shipped in the nvidia-pytriton wheel
#   MM_BACKEND_DIR  Triton --backend-directory assembled by scripts/setup (holds python/)
#   MM_TINY_MODEL   the tiny Qwen2-VL checkpoint built by scripts/setup
#   PATH            venv bin first: the Python-backend stub finds its environment through `python3`
#   MM_LIBPYTHON_DIR the venv's base interpreter's libpython dir, when it has one (see below), else empty
#   LD_LIBRARY_PATH nvidia_pytriton.libs (server, backend, stub) + MM_LIBPYTHON_DIR (stub) + nvidia
#                   cuda_runtime (perf_analyzer)
#
# Safe to source several times (no duplicate PATH entries), before the venv exists, and under set -euo pipefail.

MM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MM_ROOT
export MM_VENV="$MM_ROOT/.venv"
export MM_PYTHON="$MM_VENV/bin/python"
export MM_CACHE="${MM_CACHE:-$MM_ROOT/.cache}"

# Python X.Y of the venv (from pyvenv.cfg, no interpreter start), else of the python3 that will make it.
MM_PY_VERSION=""
if [ -f "$MM_VENV/pyvenv.cfg" ]; then
    MM_PY_VERSION="$(sed -n 's/^version[_a-z]* *= *\([0-9]*\.[0-9]*\).*/\1/p' "$MM_VENV/pyvenv.cfg" | head -n1)"
fi
if [ -z "$MM_PY_VERSION" ] && command -v python3 >/dev/null 2>&1; then
    MM_PY_VERSION="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
fi
export MM_PY_VERSION
export MM_SITE="$MM_VENV/lib/python$MM_PY_VERSION/site-packages"

# The Python-backend stub embeds libpython$MM_PY_VERSION.so.1.0 and uses the venv's base interpreter's
# stdlib. Both must be the same CPython build: a pyenv 3.11.7 stdlib under Debian's 3.11.2 libpython fails
# with "undefined symbol: _PyModule_Add" (e.g. importing ssl). When the base interpreter is a shared build,
# its own libpython goes first on LD_LIBRARY_PATH (searched before the system's).
MM_LIBPYTHON_DIR=""
_mm_home=""
if [ -f "$MM_VENV/pyvenv.cfg" ]; then _mm_home="$(sed -n 's/^home *= *//p' "$MM_VENV/pyvenv.cfg" | head -n1)"; fi
if [ -n "$_mm_home" ] && [ -n "$MM_PY_VERSION" ] && [ -e "$_mm_home/../lib/libpython$MM_PY_VERSION.so.1.0" ]; then
    MM_LIBPYTHON_DIR="$(cd "$_mm_home/../lib" && pwd)"
fi
unset _mm_home
export MM_LIBPYTHON_DIR

export TRITONSERVER="$MM_SITE/pytriton/tritonserver/bin/tritonserver"
export MM_BACKEND_DIR="$MM_CACHE/triton/backends"
export MM_TINY_MODEL="$MM_CACHE/models/tiny-qwen2-vl"

_mm_prepend() {  # _mm_prepend VAR DIR: put DIR first in the colon list VAR, once
    local var="$1" dir="$2" cur
    cur="${!var:-}"
    cur=":$cur:"
    cur="${cur//:$dir:/:}"
    cur="${cur#:}"; cur="${cur%:}"
    if [ -n "$cur" ]; then printf -v "$var" '%s:%s' "$dir" "$cur"; else printf -v "$var" '%s' "$dir"; fi
    export "${var?}"
}
_mm_prepend LD_LIBRARY_PATH "$MM_SITE/nvidia/cuda_runtime/lib"
if [ -n "$MM_LIBPYTHON_DIR" ]; then _mm_prepend LD_LIBRARY_PATH "$MM_LIBPYTHON_DIR"; fi
_mm_prepend LD_LIBRARY_PATH "$MM_SITE/nvidia_pytriton.libs"
_mm_prepend PATH "$MM_VENV/bin"
unset -f _mm_prepend

# No model hub is reachable (and none is wanted): never let transformers/huggingface_hub try.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
