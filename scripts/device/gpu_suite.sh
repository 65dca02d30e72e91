#!/usr/bin/env bash
# scripts/device/gpu_suite.sh: the whole GPU check in ONE device `run` (2-GPU kind, e.g. nvidia-h100-x2):
# environment, GPU transfer tests, the transfer benchmark, the Triton oracle on GPUs; everything under $OUT.
#
# From the repository root of a checkout that has (see docs/GPU.md):
#   .device-bundle/  built by ../shared/tools/device-bundle (tritonserver 2.51 + numpy 1.26.4 for CPython 3.12)
#   .whl/            pyzmq cp312 manylinux wheel (the device image lacks pyzmq)
#   .cache/models/tiny-qwen2-vl   built by scripts/setup (or python -m mm_models.build_tiny --out ...)
# the call is:
#   run(kind="nvidia-h100-x2", carry=[".device-bundle", ".whl", ".cache/models/tiny-qwen2-vl"],
#       command="bash scripts/device/gpu_suite.sh")
#
# MM_GPU_STAGES picks stages (default: "env transfer pipeline bench"; "unit" adds the CPU unit tests); MM_BENCH_ARGS passes arguments to
# scripts/bench_transfer.py (e.g. "--quick"). Each stage has its own time limit so the command ends well
# inside the device's 10-minute limit and what ran comes back. Files back: suite.log (summary), gpu.log,
# bench.log, pipeline.log, unit.log, bench_transfer.json, bench_transfer.png, logs.tgz (server logs).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu-suite-out}"
mkdir -p "$OUT"
STAGES="${MM_GPU_STAGES:-env transfer pipeline bench}"
T0=$SECONDS
say() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*" | tee -a "$OUT/suite.log"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

# NVLink multicast stays off (KINDS.md): for this shell and everything it starts, tritonserver included.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export MM_TINY_MODEL="$ROOT/.cache/models/tiny-qwen2-vl" MM_GPU_LOG_DIR="$OUT/serverlogs"
mkdir -p "$MM_GPU_LOG_DIR"

# ------------------------------------------------------------------------------------------------ env
say "stages: $STAGES"
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nvidia-smi topo -m; } >>"$OUT/suite.log" 2>&1
if [ ! -x /tmp/v/bin/python ]; then
    mkdir -p /tmp/triton && tar xJf .device-bundle/triton-slim.txz -C /tmp/triton \
        && chmod +x /tmp/triton/pytriton/tritonserver/bin/tritonserver || { say "FAILED: bundle"; exit 1; }
    python3 -m venv /tmp/v && /tmp/v/bin/pip install -q --no-index --no-deps .device-bundle/numpy-*.whl .whl/*.whl \
        || { say "FAILED: venv"; exit 1; }
    SITE="$(/tmp/v/bin/python -c 'import site;print(site.getsitepackages()[0])')"
    # The image's packages, less those built for numpy 2 that transformers imports when present
    # (scikit-learn, scipy, ...): with the numpy 1.26 that Triton 2.51's Python backend needs they
    # fail to import, and transformers then reports Qwen2VLForConditionalGeneration as missing.
    BASE="$(python3 -c 'import site;print(site.getsitepackages()[0])')"
    mkdir -p /tmp/base-site
    for f in "$BASE"/*; do
        n="$(basename "$f")"; low="${n,,}"
        case "$low" in
            sklearn|sklearn[-_.]*|scikit_learn*|scipy|scipy[-_.]*|pandas|pandas[-_.]*|pyarrow|pyarrow[-_.]*|numba|numba[-_.]*|\
            skimage|scikit_image*|cv2|opencv*|h5py|h5py[-_.]*|tensorstore*|statsmodels*|xarray*|seaborn*) continue ;;
        esac
        ln -s "$f" "/tmp/base-site/$n"
    done
    echo /tmp/base-site >"$SITE/base-env.pth"
    printf '%s\n%s\n' "$ROOT/backends" "$ROOT/client" >"$SITE/mm-disagg.pth"
    mkdir -p /tmp/be/python && cp /tmp/triton/pytriton/tritonserver/backends/python/{libtriton_python.so,triton_python_backend_utils.py} \
        /tmp/triton/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub /tmp/be/python/
fi
export TRITONSERVER=/tmp/triton/pytriton/tritonserver/bin/tritonserver MM_BACKEND_DIR=/tmp/be
export LD_LIBRARY_PATH="/tmp/triton/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PATH="/tmp/v/bin:$PATH"
export PYTHONPATH=/tmp/triton   # tests/harness.py finds the server's libraries next to a `pytriton` package
PY=/tmp/v/bin/python
$PY - <<'PYEOF' 2>&1 | tee -a "$OUT/suite.log"
import numpy, torch, zmq, transformers, PIL, sys
from mmtransfer import nccl_lib
lib = nccl_lib.load()
print("python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__, "zmq", zmq.__version__,
      "transformers", transformers.__version__, "| NCCL", lib.version_string(), "from", lib.path)
print("gpus:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PYEOF
timeout 120 $PY scripts/device/diag.py >"$MM_GPU_LOG_DIR/diag.log" 2>&1; grep -E "import|FAILED|Error|zmq" "$MM_GPU_LOG_DIR/diag.log" | tail -12 | tee -a "$OUT/suite.log"
[ -d "$MM_TINY_MODEL" ] || $PY -m mm_models.build_tiny --out "$MM_TINY_MODEL" 2>&1 | tail -2 | tee -a "$OUT/suite.log"

BUDGET_S="${MM_SUITE_BUDGET_S:-570}"   # the whole command; the device kills it at 600 s
stage() {  # stage NAME LIMIT_S LOG CMD...: LIMIT_S is cut to what the budget still allows
    local name="$1" limit="$2" log="$3"; shift 3
    local left=$((BUDGET_S - (SECONDS - T0)))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -lt 20 ]; then say "$name: SKIPPED (budget spent)"; return; fi
    say "$name: start (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    say "$name: rc=$rc; $(grep -E '^(=+ .*(passed|failed|error).*=+|FAILED|ERROR)' "$OUT/$log" | tail -4 | tr '\n' ' ')"
}
PYTEST=($PY -m pytest -p no:cacheprovider -ra -o faulthandler_timeout=240)

if has transfer; then
    stage transfer 150 gpu.log "${PYTEST[@]}" tests/gpu/test_transfer_gpu.py -v
fi
if has pipeline; then
    stage pipeline 200 pipeline.log "${PYTEST[@]}" tests/gpu/test_pipeline_gpu.py -v
fi
if has bench; then
    stage bench 300 bench.log $PY scripts/bench_transfer.py --out "$OUT" ${MM_BENCH_ARGS:---iters 20}
    tail -40 "$OUT/bench.log" | tee -a "$OUT/suite.log"
fi
if has unit; then
    stage unit 90 unit.log "${PYTEST[@]}" -q tests/unit/test_transport_nccl_lib.py tests/unit/test_transport_channels.py \
        tests/unit/test_transfer.py tests/unit/test_protocol.py
fi
cp "$OUT"/bench_triton_server.log "$MM_GPU_LOG_DIR"/ 2>/dev/null; rm -f "$OUT"/bench_triton_server.log
find "$ROOT/.cache/logs" -name '*.log' -newer "$OUT/suite.log" -exec cp {} "$MM_GPU_LOG_DIR"/ \; 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" serverlogs 2>/dev/null && rm -rf "$MM_GPU_LOG_DIR"
say "done"
