#!/usr/bin/env bash
# Create .venv (Python >= 3.10) and install DiffTumor Studio with its GUI and test extras.
# Idempotent: a stamp file keyed on pyproject.toml's hash skips everything when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
hash=$( (cat pyproject.toml; echo "$TORCH_SPEC") | sha256sum | cut -c1-16)
stamp="$VENV/.difftumor-setup-$hash"
if [[ -f "$stamp" && -x "$VENV/bin/python" ]]; then
    exit 0
fi

find_python() {
    local c
    for c in ${PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! py=$(find_python); then
        echo "setup: error: no Python >= 3.10 with the venv module found (install python3 and python3-venv, or set PYTHON=/path/to/python3.x)" >&2
        exit 1
    fi
    echo "setup: creating $VENV with $py"
    "$py" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup: error: $VENV uses Python < 3.10; remove it (rm -rf $VENV) and run again" >&2
    exit 1
fi

pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "setup: installing $TORCH_SPEC"
"${pip[@]}" install "$TORCH_SPEC"
echo "setup: installing difftumor with the gui and test extras (editable)"
"${pip[@]}" install -e ".[gui,test]"

rm -f "$VENV"/.difftumor-setup-*
touch "$stamp"
echo "setup: done"
