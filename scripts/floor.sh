#!/usr/bin/env bash
# The tests that touch Hugging Face, against the oldest transformers pyproject.toml accepts (its `transformers>=`
# floor, the version on the GPU machines' image), in build/floor/venv: a virtual environment that sees .venv's
# packages behind its own (a .pth file adds .venv's site-packages last), so pip installs only that transformers and
# what it needs beyond .venv, and everything else (torch, tokenizers, the built extension) is what the suite ran with.
# Arguments go to pytest (default: the drop-in, generate, fallback and loading tests).
# Run after scripts/env.sh (CI: .ci/run); alone: `. .venv/bin/activate && bash scripts/floor.sh`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
FLOOR=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
(spec,) = [d for d in deps if re.match(r"transformers\b", d)]
print(re.search(r">=\s*([0-9][0-9.]*)", spec).group(1))
PY
)
VENV="$ROOT/build/floor/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv --without-pip "$VENV"
  BASE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  OWN=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$BASE')" > "$OWN/_gpt2kern_venv.pth"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('transformers') != '$FLOOR')" \
     2>/dev/null; then
  echo "floor.sh: installing transformers==$FLOOR into build/floor/venv (over .venv's packages)"
  "$VENV/bin/python" -m pip install -q "transformers==$FLOOR" > "$ROOT/build/floor/pip.log" 2>&1 \
    || { tail -n 20 "$ROOT/build/floor/pip.log"; echo "floor.sh: FAILED: pip install transformers==$FLOOR"; exit 1; }
fi
"$VENV/bin/python" -c "import transformers as t; print('floor.sh: transformers', t.__version__, 'from', t.__file__)"
if [ $# -eq 0 ]; then  # (not the in-place memory test: a minute, and no transformers API in it)
  # (test_gpu_sizes.py: the GPU bench's HF calls, static cache + compile included, on the GPU image's transformers)
  set -- tests/test_dropin.py tests/test_generate.py tests/test_fallback_cases.py tests/test_loading.py \
    tests/test_gpu_sizes.py -k "not reads_hfs_weights_in_place"
fi
"$VENV/bin/python" -m pytest -q "$@"
