#!/bin/sh
# The container image's install steps, in one place: the Dockerfile runs this, and
# scripts/check_image_install.sh runs the same on a machine without Docker.
# Usage: install_image.sh VENV SOURCE_DIR [TORCH_INDEX_URL]
#   TORCH_INDEX_URL empty: torch from pip's configured index (on our build machines,
#   the local CPU wheel); the Dockerfile passes PyTorch's CPU or CUDA index.
set -eu
venv="$1"
source_dir="$2"
torch_index="${3:-}"

python3 -m venv "$venv"
# torch first, pinned and from the chosen index, so that the project's pin finds it
# installed and no resolver is tempted by another build of it.
if [ -n "$torch_index" ]; then
    "$venv/bin/pip" install --no-cache-dir --index-url "$torch_index" "torch==2.13.0"
else
    "$venv/bin/pip" install --no-cache-dir "torch==2.13.0"
fi
# The server's dependencies are bounded in pyproject.toml (torch pinned above).
"$venv/bin/pip" install --no-cache-dir "$source_dir[server]"
