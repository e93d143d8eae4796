#!/usr/bin/env bash
# Creates (or reuses) .venv in the repository, installs torch, the project and its test extras, builds the extension.
# Sourced by scripts/test.sh and scripts/bench.sh; TORCH_SPEC overrides which torch to install.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# pip's own exit status counts (pipefail): only its noisy location warning is filtered out
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
quiet python -m pip install -q --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  # The dev machine keeps torch 2.14.1 (a CUDA 13 build that also runs on CPU) on local disk; elsewhere plain torch.
  if [ -z "${TORCH_SPEC:-}" ]; then
    if [ -f /etc/xdg/pip/constraints.txt ]; then TORCH_SPEC="torch==2.14.1"; else TORCH_SPEC="torch"; fi
  fi
  quiet python -m pip install -q "$TORCH_SPEC"
fi
quiet python -m pip install -q ninja
quiet python -m pip install -q --no-build-isolation -e '.[test]'
python -c "import gpt2kern, torch; print('gpt2kern built:', gpt2kern.ops.isa(), '| CUDA kernels:', \
gpt2kern.ops.has_cuda(), '| torch', torch.__version__)"
