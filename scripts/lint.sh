#!/usr/bin/env bash
# lint.sh — the style checks CI runs: ruff over the Python ([tool.ruff] in pyproject.toml) and clang-format over
# csrc/ (.clang-format, scripts/check_format.sh). Fix with `ruff check --fix .` and `clang-format-19 -i FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m ruff --version >/dev/null 2>&1 || "$PY" -m pip install -q ruff
"$PY" -m ruff check --no-cache .
echo "lint.sh: ruff: clean"
if [ -f scripts/check_format.sh ]; then
  bash scripts/check_format.sh
fi
