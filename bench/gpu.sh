#!/usr/bin/env bash
# The throughput benchmark on a CUDA machine: ViT-B/32 and ViT-L/14 with dummy
# weights in float16, about 6 minutes in all.
#
#   bash bench/gpu.sh                  # results in bench/results/ (or $OUT when set)
#   BENCH_SECONDS=10 bash bench/gpu.sh # shorter scenarios (default 15 s each)
#
# It needs torch with CUDA, transformers, pillow, numpy and prometheus-client, as
# the usual CUDA images have them, plus grpcio, grpcio-status,
# grpcio-health-checking, grpcio-reflection and protobuf >= 7.35.1. On a machine
# that cannot reach an index, put those wheels in .whl/ (pip download
# --only-binary=:all: --python-version 3.X ...) and they are installed from there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/clipvision-site .whl/*.whl
    export PYTHONPATH="/tmp/clipvision-site${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PY" -c "import grpc_health, grpc_reflection, grpc_status" 2>/dev/null; then
    # The CUDA image's own torch stays: only the gRPC pieces are added.
    "$PY" -m pip install -q "grpcio>=1.85.1" "grpcio-status>=1.85.1" "grpcio-health-checking>=1.85.1" \
        "grpcio-reflection>=1.85.1" "protobuf>=7.35.1,<8" prometheus-client
fi
# Run from the tree, without installing the project (whose torch pin is for CPU builds).
export PYTHONPATH="$PWD/client:$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

for model in ViT-B/32 ViT-L/14; do
    name="$(echo "$model" | tr -d '/' | tr 'A-Z' 'a-z')"
    "$PY" bench/throughput.py --model "$model" --device cuda --dtype float16 \
        --seconds "${BENCH_SECONDS:-15}" --callers 1,8,32,128 --ceiling-batches 32,64,128 \
        --out "$RESULTS/gpu-$name.json"
done
