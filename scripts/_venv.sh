# Sourced by scripts/test and scripts/demo: a virtual environment in .venv with the
# project installed editable with the given extras, reinstalled only when pyproject.toml
# changes or other extras are needed ("dev" includes every other extra). Works on a fresh
# machine: needs python3 (>= 3.10) with venv.

ensure_venv() {
    local extras="$1"
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local venv="$root/.venv"
    local python="${PYTHON:-python3}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "==> creating $venv"
        "$python" -m venv "$venv" || {
            echo "error: '$python -m venv' failed; install Python >= 3.10 with venv (Debian: apt-get install python3-venv)" >&2
            return 1
        }
    fi
    local stamp="$venv/.poolwatch-installed"
    local digest want have=""
    digest="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
    want="$digest [$extras]"
    [ -f "$stamp" ] && have="$(cat "$stamp")"
    if [ "$have" != "$want" ] && [ "$have" != "$digest [dev]" ]; then
        echo "==> installing poolwatch[$extras] into $venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e "$root[$extras]"
        echo "$want" > "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}
