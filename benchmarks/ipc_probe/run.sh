#!/bin/bash
# The cost of one pb_utils call inside a Python-backend stub (docs/BENCHMARKS.md section 6, issue 13):
#   bash benchmarks/ipc_probe/run.sh [PORT_BASE]      (tritonserver 2.51 from scripts/env.sh; about 30 s)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/env.sh"
base="${1:-18300}"
"$TRITONSERVER" --model-repository "$here/repo" --backend-directory "$MM_BACKEND_DIR" \
  --http-port "$base" --grpc-port "$((base + 1))" --metrics-port "$((base + 2))" > /tmp/ipcprobe-server.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -sf "localhost:$base/v2/models/ipcprobe/ready" > /dev/null && break
  sleep 1
done
"$MM_PYTHON" "$here/client.py" "localhost:$((base + 1))"
