#!/usr/bin/env bash
# scripts/device/hang_probe.sh: catch the mm_pipeline_stream stub hang seen on one H200 (docs/RELIABILITY.md
# section 6) in the act and take its stacks. Run inside gpu_suite.sh's prepared environment (stage cmd):
#   MM_GPU_STAGES=cmd MM_GPU_CMD='bash scripts/device/hang_probe.sh' bash scripts/device/gpu_suite.sh
# It repeats scripts/bench_engine.py's mm_pipeline point (tiny model, encoder and language on GPU 0, c=4,
# MAX_TOKENS 16, 64 requests), each on a fresh tritonserver (the hang came at the first point after start-up),
# until one stalls: mm_pipeline_stream's success count unchanged for STALL_S once it served one. Then,
# for every stub and tritonserver: py-spy's Python (+native) stacks and cuda-gdb's native backtraces of all
# threads, into $OUT/hang-<n>.txt. Needs py-spy (a wheel in .whl/) and cuda-gdb (the device image has it).
# Knobs: PROBE_RUNS (20), PROBE_BUDGET_S (480), STALL_S (8), PROBE_PLACE (the --gpu arguments; empty: CPU),
# PROBE_ARGS (extra bench_engine.py arguments), DEBUGGER (cuda-gdb; gdb where there is one).
set -uo pipefail
OUT="${OUT:-/tmp/hang-probe-out}"
RUNS="${PROBE_RUNS:-20}" BUDGET_S="${PROBE_BUDGET_S:-480}" STALL_S="${STALL_S:-8}" DEBUGGER="${DEBUGGER:-cuda-gdb}"
STUB_BIN="${STUB_BIN:-$(ls /tmp/be/python/triton_python_backend_stub .cache/triton/backends/python/triton_python_backend_stub 2>/dev/null | head -1)}"
PLACE="${PROBE_PLACE---gpu mm_encoder=0 --gpu mm_language_stream=0}"
T0=$SECONDS
mkdir -p "$OUT"
ulimit -c unlimited  # a stub that crashes leaves a core in the server's cwd, one per process where we may say so
echo "core.%e.%p" 2>/dev/null >/proc/sys/kernel/core_pattern || echo "core_pattern: $(cat /proc/sys/kernel/core_pattern)"

metric() {  # metric PORT NAME: the value of NAME{model="mm_pipeline_stream",...} (empty when unreachable)
    curl -s -m 2 "http://127.0.0.1:$1/metrics" | awk -v n="$2" \
        'index($0, n "{") == 1 && index($0, "model=\"mm_pipeline_stream\"") { print $NF; exit }'
}

dump_all() {  # dump_all FILE: stacks of every stub and of tritonserver
    local file="$1" pid
    for pid in $(pgrep -f triton_python_backend_stub) $(pgrep -x tritonserver); do
        echo "=================== pid $pid: $(tr '\0' ' ' </proc/"$pid"/cmdline | cut -c1-200)"
        echo "--- thread states: $(cat /proc/"$pid"/task/*/stat 2>/dev/null | awk '{print $3}' | sort | uniq -c | tr '\n' ' ')"
        echo "--- py-spy dump --native"
        timeout 20 py-spy dump --native --pid "$pid" 2>&1 | head -400
        echo "--- $DEBUGGER: thread apply all bt"
        timeout 60 "$DEBUGGER" -q -batch -p "$pid" -ex "set pagination off" -ex "thread apply all bt 30" 2>&1 \
            | grep -v "^\[New Thread\|^Reading symbols\|^warning: \|^Downloading" | head -1500
    done >"$file" 2>&1
}

for run in $(seq 1 "$RUNS"); do
    [ $((SECONDS - T0 + 60)) -gt "$BUDGET_S" ] && { echo "budget spent after $((run - 1)) runs"; break; }
    work="/tmp/hp$run"
    python scripts/bench_engine.py --targets mm_pipeline $PLACE \
        --concurrency 4 --max-tokens 16 --request-rates none --requests 64 --point-timeout 40 \
        --out-dir "$work/out" --work-dir "$work" --name hp ${PROBE_ARGS:-} >"$work.log" 2>&1 &
    bench=$!
    port="" last="" since=$SECONDS hung=0
    while kill -0 "$bench" 2>/dev/null; do
        sleep 1
        [ -z "$port" ] && port="$(pgrep -a -x tritonserver | grep -o -- '--metrics-port=[0-9]*' | head -1 | cut -d= -f2)"
        [ -z "$port" ] && continue
        # a decoupled model's pending count stays 0 while it executes: the stall is a success count that stopped
        done_="$(metric "$port" nv_inference_request_success)"
        [ "$done_" != "$last" ] && { last="$done_" since=$SECONDS; }
        if [ "${done_:-0}" != "0" ] && [ $((SECONDS - since)) -ge "$STALL_S" ]; then
            echo "run $run: STALLED (success $done_ for $((SECONDS - since)) s); dumping"
            dump_all "$OUT/hang-$run.txt"
            sleep 3 && dump_all "$OUT/hang-$run-again.txt"
            hung=1
            break
        fi
    done
    wait "$bench"
    grep -E "mm_pipeline +16" "$work.log" | tail -1
    cp "$work"/hp-server.log "$OUT/hang-$run-server.log" 2>/dev/null
    # a stub that crashed while serving (not in the teardown after tritonserver's SIGTERM): that run is the one
    awk '/Signal \(15\) received/ { exit } /Fatal Python error|Signal \(11\)/ { found = 1; exit } END { exit !found }' \
        "$work"/hp-server.log 2>/dev/null && hung=1
    for core in $(find "$PWD" "$work" -maxdepth 1 -name 'core*' -type f 2>/dev/null); do
        echo "run $run: core $core"
        timeout 120 "$DEBUGGER" -q -batch "$STUB_BIN" "$core" -ex "set pagination off" -ex "info threads" -ex "bt 40" -ex "thread apply all bt 25" >"$OUT/hang-$run-$(basename "$core").txt" 2>&1
        rm -f "$core"
    done
    [ "$hung" = 1 ] && { grep -E "Signal|not healthy|error|Fatal|File " "$OUT/hang-$run-server.log" | head -40; break; }
    rm -f "$OUT/hang-$run-server.log"
    echo "run $run: no stall ($((SECONDS - T0)) s)"
done
