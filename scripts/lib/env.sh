# Shared setup for scripts/*: create .venv, install meshmerge with its compiled
# kernels and dev tools. Sourced, not executed. Idempotent: reinstalls only
# when pyproject.toml, setup.py or a kernel source changed.

MM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MM_VENV="${MM_VENV:-$MM_ROOT/.venv}"
MM_PY="$MM_VENV/bin/python"

mm_log() { printf '[meshmerge] %s\n' "$*" >&2; }

mm_python() {
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then
            if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
                command -v "$candidate"; return 0
            fi
        fi
    done
    mm_log "need Python >= 3.11 on PATH"; return 1
}

mm_stamp() {
    (cd "$MM_ROOT" && shopt -s nullglob && cat pyproject.toml setup.py meshmerge/cext/*.pyx meshmerge/cext/*.pxd meshmerge/cext/*.h) | sha256sum | cut -d' ' -f1
}

mm_ensure_env() {
    local extras="${1:-dev}"
    if [ ! -x "$MM_PY" ]; then
        mm_log "creating virtualenv in $MM_VENV"
        "$(mm_python)" -m venv "$MM_VENV"
        "$MM_PY" -m pip install -q --upgrade pip 2>/dev/null
    fi
    local want; want="$(mm_stamp)-$extras"
    if [ "$(cat "$MM_VENV/.meshmerge-stamp" 2>/dev/null)" != "$want" ]; then
        mm_log "installing meshmerge[$extras] and building Cython kernels (first run takes a minute)"
        local log="$MM_VENV/install.log"
        if ! { "$MM_PY" -m pip install -q "setuptools>=77" wheel "Cython>=3.0,<3.4" "numpy>=2.0,<3" &&
               (cd "$MM_ROOT" && "$MM_PY" -m pip install -q --no-build-isolation -e ".[$extras]"); } >"$log" 2>&1; then
            grep -v '^WARNING: Location' "$log" | tail -30 >&2
            mm_log "install failed; full log in $log"; return 1
        fi
        "$MM_PY" -c 'import meshmerge.cext' || { mm_log "kernels did not build; see $log"; return 1; }
        echo "$want" > "$MM_VENV/.meshmerge-stamp"
    fi
}
