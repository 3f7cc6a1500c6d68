#!/usr/bin/env bash
# Create (or reuse) .venv in the repository with a Python >= 3.12 found on this machine,
# and install the project with its dev extras. Safe to run again: it only reinstalls when
# pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

ok_python() {  # prints the interpreter path when "$@" runs a Python >= 3.12
  "$@" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null
}

is_312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }

candidates() {  # every interpreter we can find, one path per line, JAX's own line (3.12) first
  local cand exe v
  [ -n "${PYTHON:-}" ] && ok_python "$PYTHON"
  for cand in python3.12 python3 python3.13; do
    command -v "$cand" >/dev/null 2>&1 && ok_python "$cand"
  done
  # pyenv shims refuse to run a version that is not selected: ask pyenv for each 3.12+ one.
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9](\.|$)' | sort -V); do
      exe=$(PYENV_VERSION="$v" pyenv which python 2>/dev/null) && ok_python "$exe"
    done
  fi
  for exe in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$exe" ] && ok_python "$exe"
  done
  true
}

find_python() {  # an explicit $PYTHON wins; otherwise 3.12 is preferred over newer versions
  local all first
  if [ -n "${PYTHON:-}" ]; then ok_python "$PYTHON" && return 0; fi
  all=$(candidates)
  [ -n "$all" ] || return 1
  while read -r first; do is_312 "$first" && { echo "$first"; return 0; }; done <<< "$all"
  head -n 1 <<< "$all"
}

if [ ! -x .venv/bin/python ] || ! ok_python .venv/bin/python >/dev/null; then
  py=$(find_python) || { echo "setup: no Python >= 3.12 found; set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "setup: creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=.venv/.chimera-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing chimera and its dependencies into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
