#!/usr/bin/env bash
# Check the container image's install steps without Docker (no engine runs on our
# build machines): scripts/install_image.sh, as the Dockerfile runs it, into a fresh
# venv under /tmp; then the image's entry points: the server's --help, and its
# HEALTHCHECK command against an address where nothing listens (it must fail).
# TORCH_INDEX_URL, if set, is passed on (default: pip's configured index).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d /tmp/clipvision-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# A copy of what the Dockerfile COPYs, so nothing else of the checkout leaks in.
mkdir -p "$work/src/scripts"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/client" "$ROOT/server" "$work/src/"
cp "$ROOT/scripts/install_image.sh" "$work/src/scripts/"
echo "== install_image.sh into $work/venv"
sh "$work/src/scripts/install_image.sh" "$work/venv" "$work/src" "${TORCH_INDEX_URL:-}" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; exit 1; }
echo "== clipvision-server --help"
"$work/venv/bin/clipvision-server" --help >/dev/null
"$work/venv/bin/python" -c "import clipvision.server.app"
echo "== clipvision-healthcheck against nothing (must fail)"
rc=0
"$work/venv/bin/clipvision-healthcheck" --address 127.0.0.1:9 --timeout 2 || rc=$?
if [ "$rc" -ne 1 ]; then
    echo "the healthcheck exited $rc with no server; it must report 1 (not serving)" >&2
    exit 1
fi
echo "image install steps: ok"
