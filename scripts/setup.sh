#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with a Python >= 3.12.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh dev
# Set STEP3_PYTHON=/path/to/python3.12 to choose the interpreter yourself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
venv="$root/.venv"

is_ok_python() {  # a Python >= 3.12 with venv support
    "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    if [ -n "${STEP3_PYTHON:-}" ]; then
        if is_ok_python "$STEP3_PYTHON"; then echo "$STEP3_PYTHON"; return 0; fi
        echo "error: STEP3_PYTHON=$STEP3_PYTHON is not a Python >= 3.12 with venv" >&2; return 1
    fi
    for c in python3.12 python3.13 python3.14 python3 python; do
        if command -v "$c" >/dev/null 2>&1 && is_ok_python "$(command -v "$c")"; then command -v "$c"; return 0; fi
    done
    # pyenv installs that are not on PATH (or not selected by the shims).
    local roots=()
    if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)"); fi
    roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
    for r in "${roots[@]}"; do
        local found=()
        for c in "$r"/versions/3.*; do [ -d "$c" ] && found+=("$c"); done
        [ ${#found[@]} -gt 0 ] || continue
        while IFS= read -r c; do  # (lowest suitable version first; paths may hold spaces)
            if is_ok_python "$c/bin/python3"; then echo "$c/bin/python3"; return 0; fi
        done < <(printf '%s\n' "${found[@]}" | sort -V)
    done
    for c in /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] /opt/*/bin/python3.1[2-9]; do
        if [ -x "$c" ] && is_ok_python "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

stamp_of() { { cat pyproject.toml scripts/setup.sh constraints.txt; echo "${STEP3_UNPINNED:-}"; echo "${STEP3_PYTHON:-}"; } | sha256sum | cut -c1-16; }
stamp_file() { echo "$venv/.step3-stamp-${1:-base}"; }
up_to_date() { [ -x "$venv/bin/python" ] && [ -f "$(stamp_file "$1")" ] && [ "$(cat "$(stamp_file "$1")")" = "$(stamp_of)" ]; }

# A venv set up with the dev extras also serves the plain install.
if up_to_date "$extras" || { [ -z "$extras" ] && up_to_date dev; }; then
    exit 0
fi

if ! py="$(find_python)"; then
    cat >&2 <<'MSG'
error: step3-jax needs Python >= 3.12 (JAX 0.11 does not support older Pythons), and none was found.
       Looked for python3.14/3.13/3.12/python3 on PATH, pyenv versions, /usr/bin and /usr/local/bin.
       Install one (e.g. `pyenv install 3.12`, or your OS package python3.12 with python3.12-venv)
       or point STEP3_PYTHON at it, then run this command again.
MSG
    exit 1
fi
echo "setting up .venv with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))" >&2
version_of() { "$1" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null; }
# A venv that cannot be used as it is is made again: its Python gone (uninstalled, upgraded) or too old, no pip
# in it (another tool made it, or its first set-up was interrupted), or STEP3_PYTHON names another version.
if [ -e "$venv" ] && { ! is_ok_python "$venv/bin/python" || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1 \
        || { [ -n "${STEP3_PYTHON:-}" ] && [ "$(version_of "$venv/bin/python")" != "$(version_of "$py")" ]; }; }; then
    echo "re-creating .venv (its Python is missing, too old, without pip, or not STEP3_PYTHON's version)" >&2
    rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
logf="$venv/setup.log"
pins=(-c constraints.txt)  # the versions the suite last passed with; STEP3_UNPINNED=1: the newest pyproject allows
[ -n "${STEP3_UNPINNED:-}" ] && pins=()
if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install "${pins[@]}" -e "$spec"; } >"$logf" 2>&1; then
    tail -n 30 "$logf" >&2
    echo "error: installing step3-jax into .venv failed (full log: $logf)" >&2
    exit 1
fi
rm -f "$venv"/.step3-stamp-*
stamp_of > "$(stamp_file "$extras")"
echo "set up .venv (log: $logf)" >&2
