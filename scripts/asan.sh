#!/usr/bin/env bash
# The op and model tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU extension.
#
# Builds in a copy of the sources under build/asan/ (GPT2KERN_SANITIZE=1, see setup.py), so the normal in-place
# build is untouched and re-runs only recompile what changed. Python itself is not instrumented: the ASan runtime
# is preloaded into it. Leak checking is off (CPython and torch keep allocations for the life of the process);
# any other report — out-of-bounds access, use after free, undefined behaviour — aborts the process, so the step
# fails. Arguments go to pytest (default: the op, error, fallback, property and model tests).
# Run after scripts/env.sh (CI: .ci/run); alone: `. .venv/bin/activate && bash scripts/asan.sh`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC="$ROOT/build/asan/src"
mkdir -p "$SRC"
# copy only what changed (cp -u keeps ninja's view of mtimes), drop any normal build of _C that came along
for p in setup.py pyproject.toml buildtools csrc gpt2kern tests; do cp -ru --preserve=timestamps "$ROOT/$p" "$SRC/"; done
rm -f "$SRC"/gpt2kern/_C*.so
cd "$SRC"
start=$(date +%s)
GPT2KERN_SANITIZE=1 GPT2KERN_NO_CUDA=1 python setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -40 build.log; echo "asan.sh: sanitizer build failed"; exit 1; }
echo "asan.sh: sanitizer build $(( $(date +%s) - start ))s"

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
python -c "import gpt2kern, sys; assert gpt2kern.__file__.startswith('$SRC'), gpt2kern.__file__; print('asan.sh: sanitized gpt2kern from', gpt2kern.__file__)"
if [ $# -eq 0 ]; then
  set -- tests/test_layernorm.py tests/test_gelu.py tests/test_embedding.py tests/test_matmul.py \
    tests/test_attention.py tests/test_errors.py tests/test_fallback.py tests/test_model_parity.py \
    tests/test_properties.py tests/test_crashproof.py tests/test_concurrency.py tests/test_matmul_lowp.py \
    tests/test_matmul_int8dot.py
fi
start=$(date +%s)
# -p no:cacheprovider: the copy is scratch; reports go to stderr, which pytest shows for a crashed test
python -m pytest -q -p no:cacheprovider -x "$@" 2>&1 | tee pytest.log
rc=${PIPESTATUS[0]}
echo "asan.sh: tests $(( $(date +%s) - start ))s, exit $rc"
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" pytest.log; then
  echo "asan.sh: sanitizer reports found (see above)"; exit 1
fi
exit "$rc"
