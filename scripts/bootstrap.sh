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

# The stamp has one line per install: its extras and pyproject.toml's hash. An install
# with every extra asked for satisfies the request, so scripts/serve ("server") after
# scripts/test ("server,dev") installs nothing.
stamp="$VENV/.clipvision-installed"
if command -v sha256sum >/dev/null; then
    sum="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
else  # macOS
    sum="$(shasum -a 256 "$ROOT/pyproject.toml" | cut -d' ' -f1)"
fi
want="$EXTRAS $sum"

_clipvision_installed() {
    local extras hash extra
    [ -f "$stamp" ] || return 1
    while read -r extras hash; do
        [ "$hash" = "$sum" ] || continue
        for extra in ${EXTRAS//,/ }; do
            case ",$extras," in
                *",$extra,"*) ;;
                *) continue 2 ;;
            esac
        done
        return 0
    done <"$stamp"
    return 1
}

if ! _clipvision_installed; then
    echo "bootstrap: installing clipvision[$EXTRAS] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch first and pinned, so no resolver is tempted by another build of it.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
    echo "$want" >> "$stamp"
fi
export PATH="$VENV/bin:$PATH"
