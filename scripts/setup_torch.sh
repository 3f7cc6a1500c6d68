#!/usr/bin/env bash
# Create .venv-torch (repo root) with a CPU-only PyTorch 2.13 for the torch peer of
# benchmarks/train_step.py. Reused when it already exists and imports torch.
#
#     bash benchmarks/setup_torch.sh
#
# Why a separate venv on Python 3.11: the CPU wheel of torch 2.13 on these machines exists only
# for cp311; on Python 3.12, `pip install torch==2.13.0` resolves to the CUDA build plus several
# GB of nvidia-* packages. The script checks the resolution with `pip install --dry-run` first
# and refuses to install anything that would pull CUDA.
# Environment: PYTHON311=/path/to/python3.11 overrides the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-torch"
PKGS=(torch==2.13.0 numpy)

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "reusing $VENV: $("$VENV/bin/python" -c 'import torch, sys; print("torch", torch.__version__, "on Python", sys.version.split()[0])')"
    exit 0
fi

find_python() {
    local cand
    for cand in "${PYTHON311:-}" /root/.pyenv/versions/3.11.7/bin/python "$(command -v python3.11 || true)"; do
        if [[ -n "$cand" && -x "$cand" ]] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    # pyenv shim: needs the version selected explicitly
    if PYENV_VERSION=3.11.7 python3.11 -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
        PYENV_VERSION=3.11.7 python3.11 -c 'import sys; print(sys.executable)'; return 0
    fi
    return 1
}

PY="$(find_python)" || { echo "error: no Python 3.11 found (set PYTHON311=/path/to/python3.11)" >&2; exit 1; }
echo "creating $VENV with $PY"
rm -rf "$VENV"
"$PY" -m venv "$VENV"

# Refuse a CUDA build: look at what pip would install before installing it.
plan="$("$VENV/bin/python" -m pip install --dry-run "${PKGS[@]}" 2>&1)" || { echo "$plan" >&2; exit 1; }
would="$(grep -i '^Would install' <<<"$plan" || true)"
echo "$would"
if grep -qiE 'nvidia|cuda|triton' <<<"$would" || ! grep -qE 'torch-2\.13\.0\+cpu' <<<"$would"; then
    echo "error: pip would not install the CPU-only torch 2.13.0+cpu here (see the plan above);" >&2
    echo "       refusing to download a CUDA build. Provide a cp311 CPU wheel (pip find-links) and retry." >&2
    rm -rf "$VENV"
    exit 1
fi
"$VENV/bin/python" -m pip install --quiet "${PKGS[@]}"
"$VENV/bin/python" -c 'import torch, numpy, sys; print("ok: torch", torch.__version__, "numpy", numpy.__version__, "Python", sys.version.split()[0], "threads", torch.get_num_threads())'
