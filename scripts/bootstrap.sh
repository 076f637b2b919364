# Sourced by scripts/serve and scripts/test: make .venv hold the project with the
# given extras, installing only when pyproject.toml (or the extras) changed.
# Usage: . scripts/bootstrap.sh EXTRAS   (for example "server" or "server,dev")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLIPVISION_VENV:-$ROOT/.venv}"
EXTRAS="$1"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.clipvision-installed"
want="$EXTRAS $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    echo "bootstrap: installing clipvision[$EXTRAS] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch first and pinned, so no resolver is tempted by another build of it.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
    echo "$want" >> "$stamp"
fi
export PATH="$VENV/bin:$PATH"
