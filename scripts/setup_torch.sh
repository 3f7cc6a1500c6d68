#!/usr/bin/env bash
# Create .venv-torch (repo root): CPU-only PyTorch 2.13 plus transformers and safetensors, for
# the torch peer of benchmarks/train_step.py and the Hugging Face export check
# (scripts/hf_torch_check.py, run by tests/train/test_hf.py, tests/train/test_hf_hybrids.py and
# scripts/verify_hf_export.py).
#
#     bash scripts/setup_torch.sh
#
# Reused when it already exists and imports torch; transformers / safetensors are added to it if
# they are missing or transformers is outside the tested range (so a .venv-torch made for the
# benchmark only is upgraded, not rebuilt).
#
# Why a separate venv on Python 3.11: the CPU wheel of torch 2.13 on these machines exists only
# for cp311 (pip find-links, e.g. /opt/wheels); on Python 3.12, `pip install torch==2.13.0`
# resolves to the CUDA build plus several GB of nvidia-* packages. The script checks the
# resolution with `pip install --dry-run` first and refuses to install anything that would pull
# CUDA. Environment: PYTHON311=/path/to/python3.11 overrides the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-torch"
TORCH=(torch==2.13.0)
# The transformers range CI tests the Hugging Face export against (train/hf/, README "Export and
# import"): the hybrid architectures' modelling files change between minor releases.
TRANSFORMERS="transformers>=5.25,<5.26"
EXTRAS=("$TRANSFORMERS" safetensors numpy)

# Print pip's install plan for "$@" (kept in $WOULD) and fail if it would bring in CUDA or a
# torch build other than the CPU one.
WOULD=""
check_plan() {
    local plan
    plan="$("$VENV/bin/python" -m pip install --dry-run "$@" 2>&1)" || { echo "$plan" >&2; return 1; }
    WOULD="$(grep -i '^Would install' <<<"$plan" || true)"
    local would="$WOULD"
    echo "$would"
    if grep -qiE 'nvidia|cuda|triton' <<<"$would"; then
        echo "error: pip would install CUDA packages (see the plan above); refusing." >&2
        return 1
    fi
    if grep -qE '(^| )torch-' <<<"$would" && ! grep -qE 'torch-2\.13\.0\+cpu' <<<"$would"; then
        echo "error: pip would not install the CPU-only torch 2.13.0+cpu here (see the plan above);" >&2
        echo "       refusing to download a CUDA build. Provide a cp311 CPU wheel (pip find-links) and retry." >&2
        return 1
    fi
}

report() {
    "$VENV/bin/python" -c 'import torch, transformers, safetensors, numpy, sys; print("ok: torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__, "Python", sys.version.split()[0], "threads", torch.get_num_threads())'
}

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if "$VENV/bin/python" -c "import transformers, safetensors; v = tuple(map(int, transformers.__version__.split('.')[:2])); raise SystemExit(v != (5, 25))" 2>/dev/null; then
        echo "reusing $VENV"
    else
        echo "adding $TRANSFORMERS and safetensors to $VENV"
        # torch is named in the plan so that pip keeps the installed CPU build.
        check_plan "${TORCH[@]}" "${EXTRAS[@]}"
        "$VENV/bin/python" -m pip install --quiet "${TORCH[@]}" "${EXTRAS[@]}"
    fi
    report
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
if ! check_plan "${TORCH[@]}" "${EXTRAS[@]}" || ! grep -qE 'torch-2\.13\.0\+cpu' <<<"$WOULD"; then
    echo "error: torch==2.13.0 does not resolve to the local CPU wheel here; nothing installed." >&2
    rm -rf "$VENV"
    exit 1
fi
"$VENV/bin/python" -m pip install --quiet "${TORCH[@]}" "${EXTRAS[@]}"
report
