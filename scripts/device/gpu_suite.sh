#!/usr/bin/env bash
# scripts/device/gpu_suite.sh: the whole GPU check in ONE device `run` (2-GPU kind, e.g. nvidia-h100-x2):
# environment, GPU transfer tests, the transfer benchmark, the Triton oracle on GPUs; everything under $OUT.
#
# From the repository root of a checkout that has (see docs/GPU.md):
#   .device-bundle/  built by ../shared/tools/device-bundle (tritonserver 2.51 + numpy 1.26.4 for CPython 3.12)
#                    + tritonclient-slim.txz from scripts/device/client_bundle.sh (stages scaleout, bench2b:
#                    tritonclient.grpc for the split servers, perf_analyzer, libb64)
#   .whl/            pyzmq cp312 manylinux wheel (the device image lacks pyzmq); python-rapidjson (client_bundle.sh)
#   .cache/models/tiny-qwen2-vl   built by scripts/setup (or python -m mm_models.build_tiny --out ...)
# the call is:
#   run(kind="nvidia-h100-x2", carry=[".device-bundle", ".whl", ".cache/models/tiny-qwen2-vl"],
#       command="bash scripts/device/gpu_suite.sh")
#
# MM_GPU_STAGES picks stages (default: "env transfer pipeline bench"; "transfer1gpu" runs on ONE GPU the same-GPU
# tests of tests/gpu/test_transfer_gpu.py and scripts/bench_transfer.py --mode one-gpu (files back: gpu1.log,
# bench1gpu.log, bench_transfer_one_gpu.json, bench_transfer_one_gpu.png; arguments: MM_BENCH1GPU_ARGS; e.g.
# MM_GPU_STAGES="env transfer1gpu" on nvidia-h200); "unit" adds the CPU unit tests; "scaleout" the
# split-server / M x N instance oracle on GPUs, tests/gpu/test_scaleout_gpu.py; "bench2b" builds a random-weights
# Qwen2-VL-2B-size checkpoint here (mm_models.sized, in the background from the start) and runs
# scripts/bench_pipeline.py on it: mm_pipeline encoder GPU 0 / language GPU 1 vs mm_monolithic on GPU 0; its
# arguments: MM_BENCH2B_ARGS); "engine" runs scripts/bench_engine.py on the same checkpoint, everything on GPU 0
# (in-process engine, mm_pipeline over CUDA IPC, mm_monolithic: requests/s, TTFT, inter-token latency at
# concurrency 1..64 and one Poisson rate, MAX_TOKENS 16 and 128; arguments: MM_ENGINE_ARGS; files back:
# engine.log, engine-gpu-2b.json, engine-gpu-2b.png); "phases1gpu" runs, on the same checkpoint with mm_encoder,
# mm_language and mm_monolithic all on GPU 0, scripts/bench_pipeline.py at concurrency 1 and 4 (MAX_TOKENS 16) and
# then scripts/bench_engine.py --targets inprocess,mm_pipeline,mm_monolithic at concurrency 1 and 4 (the in-process
# upper bound on the same requests as its served points), both printing the per-phase breakdown of every point
# (mm_phase_seconds; arguments: MM_PHASES_ARGS, MM_PHASES_ENGINE_ARGS; files back: phases1gpu.log,
# phases-pipeline-gpu0.json, phases1gpu-engine.log, phases-engine-gpu0.json); "cmd" runs MM_GPU_CMD (bash -c) in the
# prepared environment within MM_GPU_CMD_LIMIT seconds (default 300; output: cmd.log). MM_BENCH_ARGS passes arguments to scripts/bench_transfer.py (e.g. "--quick"). Each stage has its own time limit so the command ends well
# inside the device's 10-minute limit and what ran comes back. Files back: suite.log (summary), gpu.log,
# bench.log, pipeline.log, unit.log, bench_transfer.json, bench_transfer.png, logs.tgz (server logs);
# scaleout.log; bench2b.log, pipeline-gpu-2b.json, pipeline-gpu-2b.png (at most 8 files come back: pick stages).
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
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nvidia-smi topo -m; df -h /dev/shm /tmp; } >>"$OUT/suite.log" 2>&1
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
    # tritonclient (Python part: the language server's mm_pipeline calls encoder servers over gRPC; the generated
    # repositories' configs) and perf_analyzer, from scripts/device/client_bundle.sh; grpcio/protobuf: the image's
    if [ -f .device-bundle/tritonclient-slim.txz ]; then
        mkdir -p /tmp/tc && tar xJf .device-bundle/tritonclient-slim.txz -C /tmp/tc \
            && cp -r /tmp/tc/site/tritonclient "$SITE/" && install -m 755 /tmp/tc/bin/perf_analyzer /tmp/v/bin/ \
            || say "WARNING: tritonclient-slim.txz did not unpack"
    fi
    mkdir -p /tmp/be/python && cp /tmp/triton/pytriton/tritonserver/backends/python/{libtriton_python.so,triton_python_backend_utils.py} \
        /tmp/triton/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub /tmp/be/python/
fi
# perf_analyzer's libraries: libb64.so.0d (Debian libb64-0d, else the Triton bundle's copy) and libcudart.so.12
# (the Triton bundle's; the image has CUDA 13), under their plain names
mkdir -p /tmp/palib
for pat in "libb64.so.0d:/tmp/tc/lib/libb64.so.0d" "libb64.so.0d:/tmp/triton/nvidia_pytriton.libs/libb64-*.so.0d" \
           "libcudart.so.12:/tmp/triton/nvidia_pytriton.libs/libcudart-*.so.12*"; do
    name="${pat%%:*}"; src="$(ls ${pat#*:} 2>/dev/null | head -1)"
    [ -e "/tmp/palib/$name" ] || { [ -n "$src" ] && ln -sf "$src" "/tmp/palib/$name"; }
done
export TRITONSERVER=/tmp/triton/pytriton/tritonserver/bin/tritonserver MM_BACKEND_DIR=/tmp/be
export LD_LIBRARY_PATH="/tmp/triton/nvidia_pytriton.libs:/tmp/palib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PATH="/tmp/v/bin:$PATH"
export PYTHONPATH=/tmp/triton   # mm_triton.server_env finds the server's libraries next to a `pytriton` package
PY=/tmp/v/bin/python
$PY - <<'PYEOF' 2>&1 | tee -a "$OUT/suite.log"
import numpy, torch, zmq, transformers, PIL, sys
from mmtransfer import nccl_lib
lib = nccl_lib.load()
print("python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__, "zmq", zmq.__version__,
      "transformers", transformers.__version__, "| NCCL", lib.version_string(), "from", lib.path)
print("gpus:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
try:
    import google.protobuf, grpc, tritonclient.grpc  # noqa: F401
    print("tritonclient.grpc ok (grpcio", grpc.__version__, "protobuf", google.protobuf.__version__ + ")")
except Exception as exc:
    print("tritonclient.grpc NOT importable:", type(exc).__name__, exc)
PYEOF
command -v perf_analyzer >/dev/null && { perf_analyzer --version 2>&1 | head -2 | tee -a "$OUT/suite.log"; }
# the realistic-size checkpoint for bench2b is built in the background while the other stages run (CPU work)
SIZED_DIR="${MM_SIZED_DIR:-/tmp/q2b}"
if has bench2b || has engine || has phases1gpu; then
    ( OMP_NUM_THREADS=16 $PY -m mm_models.sized --preset qwen2-vl-2b --out "$SIZED_DIR" -v >"$OUT/sized.log" 2>&1; echo "rc=$?" >>"$OUT/sized.log" ) &
    SIZED_PID=$!
    say "building the qwen2-vl-2b-size checkpoint in $SIZED_DIR (pid $SIZED_PID)"
fi
if has env; then
    timeout 120 $PY scripts/device/diag.py >"$MM_GPU_LOG_DIR/diag.log" 2>&1; grep -E "import|FAILED|Error|zmq" "$MM_GPU_LOG_DIR/diag.log" | tail -12 | tee -a "$OUT/suite.log"
fi
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
if has transfer1gpu; then
    # ONE GPU (nvidia-h200): the same-GPU tests of tests/gpu/test_transfer_gpu.py (the NCCL ones need two GPUs) and
    # the one-GPU benchmark (CUDA IPC pull vs a raw device-to-device copy, 1-256 MiB); ~4 minutes in all
    stage transfer1gpu 130 gpu1.log "${PYTEST[@]}" tests/gpu/test_transfer_gpu.py -v   # the 2-GPU cases skip themselves
    stage transfer1gpu-bench 110 bench1gpu.log $PY scripts/bench_transfer.py --mode one-gpu --out "$OUT" \
        ${MM_BENCH1GPU_ARGS:---iters 20 --warmup 3}
    tail -12 "$OUT/bench1gpu.log" | tee -a "$OUT/suite.log"
fi
if has pipeline; then
    stage pipeline 200 pipeline.log "${PYTEST[@]}" tests/gpu/test_pipeline_gpu.py -v
fi
if has bench; then
    stage bench 300 bench.log $PY scripts/bench_transfer.py --out "$OUT" ${MM_BENCH_ARGS:---iters 20}
    tail -40 "$OUT/bench.log" | tee -a "$OUT/suite.log"
fi
if has scaleout; then
    stage scaleout 240 scaleout.log "${PYTEST[@]}" tests/gpu/test_scaleout_gpu.py -v -s
    grep -E "servers up|concurrent requests in|per language instance|per encoder instance|transports seen" \
        "$OUT/scaleout.log" | tee -a "$OUT/suite.log"
fi
if has bench2b; then
    left=$((BUDGET_S - (SECONDS - T0) - 30))
    say "bench2b: waiting for the checkpoint build (at most ${left}s)"
    while kill -0 "$SIZED_PID" 2>/dev/null && [ $((BUDGET_S - (SECONDS - T0))) -gt 60 ]; do sleep 2; done
    tail -3 "$OUT/sized.log" | tee -a "$OUT/suite.log"
    if grep -q "^rc=0" "$OUT/sized.log"; then
        # 32 requests per load point (24 images of the log-normal mix, real Qwen2-VL geometry: 28x28 pixels per
        # token), concurrency 1..16, one Poisson rate (0.5x the pipeline's best); each point bounded
        stage bench2b 420 bench2b.log $PY scripts/bench_pipeline.py --checkpoint "$SIZED_DIR" \
            ${MM_BENCH2B_ARGS:---gpu mm_encoder=0 --gpu mm_language=1 --gpu mm_monolithic=0 --concurrency 1,2,4,8,16 --requests 32 --request-rates auto1 --rate-seconds 8 --point-timeout 90} \
            --name pipeline-gpu-2b --out-dir "$OUT" --work-dir /tmp/bench2b --markdown
        [ -f "$OUT/pipeline-gpu-2b.json" ] || cp /tmp/bench2b/pipeline-gpu-2b.partial.json "$OUT/" 2>/dev/null
        tail -30 "$OUT/bench2b.log" | tee -a "$OUT/suite.log"
        cp /tmp/bench2b/*server.log "$MM_GPU_LOG_DIR"/ 2>/dev/null
    else
        say "bench2b: SKIPPED (checkpoint build failed or unfinished)"
    fi
fi
if has engine; then
    while kill -0 "$SIZED_PID" 2>/dev/null && [ $((BUDGET_S - (SECONDS - T0))) -gt 60 ]; do sleep 2; done
    if grep -q "^rc=0" "$OUT/sized.log"; then
        # 64 slots of 4096 tokens per engine (7 GiB of bf16 KV each at the 2B size): c=64 all in the batch
        stage engine 420 engine.log $PY scripts/bench_engine.py --checkpoint "$SIZED_DIR" \
            ${MM_ENGINE_ARGS:---gpu mm_encoder=0 --gpu mm_language_stream=0 --gpu mm_monolithic_stream=0 --env MM_MAX_NUM_SEQS=64 --env MM_MAX_SEQ_LEN=4096 --point-timeout 120} \
            --name engine-gpu-2b --out-dir "$OUT" --work-dir /tmp/engine --markdown
        tail -40 "$OUT/engine.log" | tee -a "$OUT/suite.log"
        cp /tmp/engine/*server.log "$MM_GPU_LOG_DIR"/ 2>/dev/null
    else
        say "engine: SKIPPED (checkpoint build failed or unfinished)"
    fi
fi
if has phases1gpu; then
    while kill -0 "$SIZED_PID" 2>/dev/null && [ $((BUDGET_S - (SECONDS - T0))) -gt 60 ]; do sleep 2; done
    if grep -q "^rc=0" "$OUT/sized.log"; then
        # one GPU for everything: the pipeline's transfer is CUDA IPC; 32 requests a point, no Poisson points
        stage phases1gpu 240 phases1gpu.log $PY scripts/bench_pipeline.py --checkpoint "$SIZED_DIR" \
            ${MM_PHASES_ARGS:---gpu mm_encoder=0 --gpu mm_language=0 --gpu mm_monolithic=0 --concurrency 1,4 --requests 32 --request-rates none --max-tokens 16 --point-timeout 90} \
            --name phases-pipeline-gpu0 --out-dir "$OUT" --work-dir /tmp/phases1gpu --markdown --no-plot
        grep -E "^\[mm_|^    mm_|infer/s" "$OUT/phases1gpu.log" | tail -30 | tee -a "$OUT/suite.log"
        stage phases1gpu-engine 240 phases1gpu-engine.log $PY scripts/bench_engine.py --checkpoint "$SIZED_DIR" \
            ${MM_PHASES_ENGINE_ARGS:---targets inprocess,mm_pipeline,mm_monolithic --gpu mm_encoder=0 --gpu mm_language_stream=0 --gpu mm_monolithic_stream=0 --concurrency 1,4 --max-tokens 16 --request-rates none --point-timeout 90} \
            --name phases-engine-gpu0 --out-dir "$OUT" --work-dir /tmp/phases1gpu-engine --markdown
        grep -E "MAX_TOKENS|^    (inprocess|mm_)" "$OUT/phases1gpu-engine.log" | tail -30 | tee -a "$OUT/suite.log"
        rm -f "$OUT"/phases-engine-gpu0.png  # at most 8 files come back
        cp /tmp/phases1gpu/*server.log /tmp/phases1gpu-engine/*server.log "$MM_GPU_LOG_DIR"/ 2>/dev/null
    else
        say "phases1gpu: SKIPPED (checkpoint build failed or unfinished)"
    fi
fi
if has cmd; then  # any command in the prepared environment (python and tritonserver on PATH); output in cmd.log
    stage cmd "${MM_GPU_CMD_LIMIT:-300}" cmd.log bash -c "${MM_GPU_CMD:?MM_GPU_CMD names the command of stage cmd}"
    tail -40 "$OUT/cmd.log" | tee -a "$OUT/suite.log"
fi
if has unit; then
    stage unit 90 unit.log "${PYTEST[@]}" -q tests/unit/test_transport_nccl_lib.py tests/unit/test_transport_channels.py \
        tests/unit/test_transfer.py tests/unit/test_protocol.py
fi
cp "$OUT"/bench_triton_server.log "$MM_GPU_LOG_DIR"/ 2>/dev/null; rm -f "$OUT"/bench_triton_server.log
find "$ROOT/.cache/logs" -name '*.log' -newer "$OUT/suite.log" -exec cp {} "$MM_GPU_LOG_DIR"/ \; 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" serverlogs 2>/dev/null && rm -rf "$MM_GPU_LOG_DIR"
say "done"
