#!/usr/bin/env bash
# scripts/device/client_bundle.sh: what the GPU suite needs beyond ../shared/tools/device-bundle to run the
# split servers (tritonclient.grpc inside the language server's mm_pipeline) and perf_analyzer on the device
# machine, which has no package index and no tritonclient:
#   .device-bundle/tritonclient-slim.txz   site/tritonclient (2.51.0, Python part), bin/perf_analyzer,
#                                          lib/libb64.so.0d (Debian libb64-0d; perf_analyzer links it)
#   .whl/python_rapidjson-*-cp312-*.whl    tritonclient.grpc imports rapidjson
# ~7 MB together (perf_analyzer alone is 20 MB uncompressed; the wheel's perf_client copy is left out).
# libcudart.so.12, perf_analyzer's other library, is taken from the Triton bundle (nvidia_pytriton.libs) there.
# grpcio, protobuf and urllib3 come from the device image.
# Usage, from the repository root:  scripts/device/client_bundle.sh
set -euo pipefail
out=.device-bundle
mkdir -p "$out" .whl
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux1_x86_64 -d "$tmp" tritonclient==2.51.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl python-rapidjson==1.25
(cd "$tmp" && apt-get download libb64-0d >/dev/null 2>&1 || true)
mkdir -p "$tmp/x" "$tmp/b/site" "$tmp/b/bin" "$tmp/b/lib"
(cd "$tmp/x" && python3 -m zipfile -e "$tmp"/tritonclient-2.51.0-*.whl .)
cp -r "$tmp"/x/tritonclient-2.51.0.data/purelib/tritonclient "$tmp/b/site/"
find "$tmp/b/site" -name '__pycache__' -prune -exec rm -rf {} +
cp "$tmp"/x/tritonclient-2.51.0.data/data/bin/perf_analyzer "$tmp/b/bin/"
if ls "$tmp"/libb64-0d_*.deb >/dev/null 2>&1; then
    dpkg -x "$tmp"/libb64-0d_*.deb "$tmp/deb"
    cp -L "$tmp"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d "$tmp/b/lib/"
else
    echo "note: no libb64-0d .deb (apt-get download failed): the suite links the Triton bundle's copy" >&2
fi
tar cf - -C "$tmp/b" . | xz -T2 -6 >"$out/tritonclient-slim.txz"
ls -la "$out/tritonclient-slim.txz" .whl/python_rapidjson-*.whl
