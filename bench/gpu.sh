#!/usr/bin/env bash
# The GPU benchmarks, at most 8 minutes on one CUDA device (issue 20):
# 1. bench/gpu_feed.py, ViT-B/32 and ViT-L/14 in float16: model-only images/s at batch
#    128 and 256, device preprocessing against Pillow (bytes differing), and with
#    torchvision present the --gpu-decode tolerance (pixel differences, lowest cosine);
# 2. bench/throughput.py: the in-process ceiling and the server at 128 callers and one
#    stream, with exact device preprocessing (ViT-B/32, ViT-L/14) and with --gpu-decode
#    (ViT-B/32, where torchvision is there);
# 3. bench/overhead.py on CUDA: the server's CPU per image by thread (per stage) with the
#    tiny model, against the bare grpc.aio floor.
#
#   bash bench/gpu.sh                  # results in bench/results/ (or $OUT when set)
#   BENCH_SECONDS=6 bash bench/gpu.sh  # shorter windows (default 8 s each)
#
# It needs torch with CUDA, transformers, pillow, numpy and prometheus-client, as
# the usual CUDA images have them, plus grpcio, grpcio-status,
# grpcio-health-checking, grpcio-reflection, protobuf >= 7.35.1 and psutil
# (torchvision for --gpu-decode). On a machine that cannot reach an index, put those
# wheels in .whl/ (pip download --only-binary=:all: --python-version 3.X ...; at most
# 64 MiB) and they are installed from there.
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
        "grpcio-reflection>=1.85.1" "protobuf>=7.35.1,<8" prometheus-client psutil
fi
# Run from the tree, without installing the project (whose torch pin is for CPU builds).
export PYTHONPATH="$PWD/client:$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

SECONDS_EACH="${BENCH_SECONDS:-8}"
if "$PY" -c "import torchvision.io" 2>/dev/null; then GPU_DECODE=1; else
    GPU_DECODE=0; echo "torchvision is not installed: the --gpu-decode rows are left out"; fi

for model in ViT-B/32 ViT-L/14; do
    name="$(echo "$model" | tr -d '/' | tr 'A-Z' 'a-z')"
    "$PY" bench/gpu_feed.py --model "$model" --device cuda --dtype float16 --seconds 4 \
        $([ "$GPU_DECODE" = 1 ] && echo --gpu-decode) --out "$RESULTS/gpu-feed-$name.json"
done
for model in ViT-B/32 ViT-L/14; do
    name="$(echo "$model" | tr -d '/' | tr 'A-Z' 'a-z')"
    "$PY" bench/throughput.py --model "$model" --device cuda --dtype float16 --backends torch \
        --device-preprocess on --no-naive --seconds "$SECONDS_EACH" --callers 128 \
        --ceiling-batches 128 --out "$RESULTS/gpu-$name.json"
done
if [ "$GPU_DECODE" = 1 ]; then
    "$PY" bench/throughput.py --model ViT-B/32 --device cuda --dtype float16 --backends torch \
        --device-preprocess on --gpu-decode --no-naive --seconds "$SECONDS_EACH" \
        --callers 128 --ceiling-batches 128 --out "$RESULTS/gpu-vitb32-gpu-decode.json"
fi
"$PY" bench/overhead.py --device cuda --backend torch --protocol grpc --rows image \
    --seconds 4 --out "$RESULTS/gpu-overhead.json"
