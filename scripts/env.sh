#!/usr/bin/env bash
# Sets up the environment, doing only what is missing or out of date, one line per stage:
#   1 .venv in the repository   2 torch   3 numpy, ninja and the project's dependencies (numpy before the build:
#   torch warns without it)   4 the extension, built in place by ninja (compiler progress as [n/m] lines; skipped
#   when gpt2kern/_C*.so is newer than every file in csrc/, setup.py and buildtools/ and was built with the same settings)
#   5 the package itself, editable, without building the extension a second time (GPT2KERN_NO_EXT=1).
# Sourced by scripts/test.sh and scripts/bench.sh; the full output of pip and the compiler goes to build/env.log.
# TORCH_SPEC chooses the torch to install. The CUDA kernels are built when a GPU is visible or GPT2KERN_CUDA=1
# (see setup.py); MAX_JOBS limits the compiler's parallel jobs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
ENV_T0=$(date +%s)
mkdir -p build
ENV_LOG="$ROOT/build/env.log"
: > "$ENV_LOG"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "env.sh: $*"; }
# logged PATTERN CMD...: CMD's whole output to build/env.log; the lines matching PATTERN (an extended regex) are
# printed (rewritten by the sed script in $SHOW, if set), indented, cut at 150 bytes, each as soon as CMD prints it:
# every stage of the pipe passes a line on when it has it (grep --line-buffered, sed -u; `cut` and mawk would hold
# them back until CMD ends, tests/test_env_logged.py); on failure, the end of the log. CMD's own exit status counts
# (pipefail).
logged() {
  local pat=$1; shift
  if ! "$@" 2>&1 | tee -a "$ENV_LOG" | { grep --line-buffered -E "$pat" || true; } | sed -u -E "${SHOW:-}" \
       | LC_ALL=C sed -u -E 's/^(.{0,150}).*/    \1/'
  then
    say "FAILED: $* (the last lines of build/env.log:)"; tail -n 40 "$ENV_LOG"; return 1
  fi
}

# 1. the virtual environment
if [ ! -x .venv/bin/python ]; then
  say "[1/5] creating .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
  NEW_VENV=1
else
  say "[1/5] .venv exists ($(.venv/bin/python --version 2>&1))"
  NEW_VENV=0
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "$NEW_VENV" = 1 ]; then
  logged '^(ERROR|Successfully)' python -m pip install --upgrade pip setuptools wheel
fi

# 2. torch
if python -c "import torch" 2>/dev/null; then
  say "[2/5] torch $(python -c 'import importlib.metadata as m; print(m.version("torch"))') is installed"
else
  # The dev machine keeps torch 2.14.1 (a CUDA 13 build that also runs on CPU) on local disk; elsewhere plain torch.
  if [ -z "${TORCH_SPEC:-}" ]; then
    if [ -f /etc/xdg/pip/constraints.txt ]; then TORCH_SPEC="torch==2.14.1"; else TORCH_SPEC="torch"; fi
  fi
  say "[2/5] installing $TORCH_SPEC (the largest download: a minute or more)"
  logged '^(Collecting|Installing collected|Successfully|ERROR)' python -m pip install "$TORCH_SPEC"
fi

# 3. the dependencies of the project and of its tests, from pyproject.toml, without building the project
DEPS=$(python - <<'EOF'
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    p = tomllib.load(f)["project"]
print("\n".join(["numpy", "ninja"] + p["dependencies"] + p["optional-dependencies"]["test"]))
EOF
)
say "[3/5] dependencies: $(echo "$DEPS" | sed -E 's/[<>=; ].*//' | awk '!seen[$0]++' | tr '\n' ' ')"
mapfile -t DEP_ARR <<< "$DEPS"
logged '^(Collecting|Installing collected|Successfully|ERROR)' python -m pip install "${DEP_ARR[@]}"

# 4. the extension, in place; ninja recompiles only what changed
build_key() {  # what the build depends on besides the files: a change rebuilds
  echo "python=$(python -c 'import sys; print(sys.version.split()[0])')"
  echo "torch=$(python -c 'import importlib.metadata as m; print(m.version("torch"))')"
  for v in GPT2KERN_CUDA GPT2KERN_NO_CUDA GPT2KERN_REQUIRE_CUDA GPT2KERN_DEBUG TORCH_CUDA_ARCH_LIST CUDA_HOME \
           CUDA_VISIBLE_DEVICES; do echo "$v=${!v-}"; done
  echo "gpus=$(ls /dev/nvidia[0-9]* 2>/dev/null | wc -l)"
}
SO=$(ls gpt2kern/_C*.so 2>/dev/null | head -n 1 || true)
STAMP=build/ext.stamp
KEY=$(build_key)
# the stamp also names the .so it describes (mtime, size): one built by hand since (another config) is rebuilt
so_id() { stat -c 'so=%Y %s' "$1" 2>/dev/null || echo "so=none"; }
if [ -n "$SO" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY
$(so_id "$SO")" ] \
   && [ -z "$(find csrc setup.py buildtools -type f -newer "$SO" ! -path '*/__pycache__/*' | head -n 1)" ]; then
  say "[4/5] build: up to date ($SO is newer than csrc/, setup.py and buildtools/)"
else
  say "[4/5] building the extension (ninja; a few minutes from scratch on 2 cores, seconds after a small change)"
  t=$(date +%s)
  # --force: distutils would skip the link when only a header changed; ninja still compiles only what changed
  # shown: setup.py's line on the CUDA kernels, ninja's [n/m] lines as "[n/m] csrc/FILE", the link, errors
  SHOW='s#^\[([0-9]+/[0-9]+)\] .* -c ([^ ]*/)?(csrc/[^ ]+) .*#[\1] compiling \3#; s#^.* -shared .* -o ([^ ]+).*#linking \1#' \
    logged '^(gpt2kern build:|\[[0-9]+/[0-9]+\]|.* -shared .*|.*error:.*)' python setup.py build_ext --inplace --force
  SO=$(ls gpt2kern/_C*.so | head -n 1)
  printf '%s\n%s\n' "$KEY" "$(so_id "$SO")" > "$STAMP"
  say "      built $SO in $(( $(date +%s) - t ))s"
fi

# 5. the package, editable (the `gpt2kern` command); redone when pyproject.toml changed
INSTALL_STAMP=build/install.stamp
INSTALL_KEY="$ROOT $(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/gpt2kern ] && [ -f "$INSTALL_STAMP" ] && [ "$(cat "$INSTALL_STAMP")" = "$INSTALL_KEY" ] \
   && python -c "import importlib.metadata as m; m.distribution('gpt2kern')" 2>/dev/null; then
  say "[5/5] gpt2kern is installed (editable)"
else
  say "[5/5] installing gpt2kern (editable: this checkout, the \`gpt2kern\` command)"
  logged '^(ERROR|Successfully)' env GPT2KERN_NO_EXT=1 python -m pip install --no-build-isolation --no-deps -e .
  echo "$INSTALL_KEY" > "$INSTALL_STAMP"
fi
python -c "import gpt2kern, torch; print('env.sh: ready: gpt2kern', gpt2kern.ops.isa(), '| CUDA kernels:', \
gpt2kern.ops.has_cuda(), '| torch', torch.__version__, '|', torch.get_num_threads(), 'threads')"
say "set-up took $(( $(date +%s) - ENV_T0 ))s"
