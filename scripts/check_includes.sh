#!/usr/bin/env bash
# check_includes.sh — every C++ translation unit in csrc/, and every project header, compiled on its own
# (-fsyntax-only) with a second toolchain: clang 19 + libc++ 19 with _LIBCPP_REMOVE_TRANSITIVE_INCLUDES, so a
# file that uses something without including its header fails here, not in a user's build.
#
# Why: the build uses g++ and libstdc++, whose headers pull in many others. csrc/cpu/dispatch.cpp iterated a braced
# list without <initializer_list>; g++ 12 compiled it, g++ 13 did not (fixed in 440786e). Clang with libstdc++ 12
# would not have caught it either (same headers), nor plain libc++ 19 (it keeps transitive includes for old code);
# libc++ with _LIBCPP_REMOVE_TRANSITIVE_INCLUDES does: "cannot deduce type of initializer list because
# std::initializer_list was not found; include <initializer_list>".
#
# Flags: setup.py's own (its include dirs — csrc/, torch's, CUDA's — and its cxx flags, captured by running it with
# setuptools.setup stubbed out and GPT2KERN_CUDA=1), plus what distutils and torch's BuildExtension add when they
# compile (-DNDEBUG -fPIC -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C and torch's -std=c++NN).
# No GPU and no built extension needed; a Python with torch is (PYTHON, else .venv/bin/python, else python).
#
# What is checked and what is not (`--list` prints it):
#   csrc/**/*.cpp                    each on its own; csrc/cuda/ops_cuda.cpp only when setup.py would build the CUDA
#                                    kernels here (CUDA headers and a CUDA torch; -DGPT2KERN_CUDA as in that build)
#   csrc/**/*.h                      each on its own (header self-sufficiency), launch.h under the same condition
#   csrc/cpu/kernels/*.h             skipped: fragments, parsed inside each isa_*.cpp after vec.h and the GK_ISA
#                                    defines (the isa_*.cpp TUs check them in every configuration)
#   csrc/cuda/*.cu, *.cuh            skipped: device code needs nvcc or clang's CUDA mode; nvcc refuses libc++ on x86
#                                    ("libc++ is not supported on x86 system") and clang 19 supports CUDA <= 12.5
#                                    (with CUDA 13's headers its own wrapper headers fail). They include only
#                                    <cmath>, <cstdint>, <algorithm>, <type_traits> and CUDA's headers.
# Clang ignores `#pragma GCC target`; -fsyntax-only stops before codegen, where intrinsics would need it.
#
# Speed: torch's headers take most of the time (torch/types.h ~12 s to parse alone), so torch/types.h is parsed
# once into a precompiled header (PCH), and each file whose preprocessed includes (clang -M) contain it is compiled
# after it. That changes nothing a file sees: the PCH holds only what the file includes anyway, earlier. Parsed
# after it instead of before are only the headers a file includes before its torch include: torch's own, or project
# headers, each of which is checked on its own here. (A PCH of torch/extension.h too saves nothing: it takes ~20 s
# to build and ops.cpp and engine.cpp still take ~7 s each after it, ~17 s after torch/types.h's.)
#
# Usage: bash scripts/check_includes.sh             all of csrc/ (CI: .ci/run), one line per file
#        bash scripts/check_includes.sh FILE...     just these files (any path: .cpp as a TU, .h as a header)
#        bash scripts/check_includes.sh --list      what would be checked or skipped, and why; compiles nothing
# The toolchain is installed with apt-get when missing (Debian/Ubuntu, as root; ~10 s). JOBS: parallel compiles
# (default: the number of cores). KEEP_TMP=1 keeps the temporary folder (flags, PCH). Exit status 1 when a file
# fails, with the compiler's first error for each. Time on the dev machine (2 cores): ~70 s of CPU, about a minute.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LLVM=19
CXX=clang++-$LLVM
APT_PKGS=("clang-$LLVM" "libc++-$LLVM-dev" "libc++abi-$LLVM-dev" "libomp-$LLVM-dev")  # libomp: omp.h for -fopenmp
say() { echo "check_includes.sh: $*"; }

PCHS=(torch/types.h)  # the headers precompiled (the largest first, where a file reaches several)

# --one FILE [pch] (internal, run by xargs): one compile, one line (or the line and the first error); pch: look for
# a PCH (built by then) of a header in PCHS that the file reaches
if [ "${1:-}" = "--one" ]; then
  f=$2 pch=${3:-}
  mapfile -t flags < "$CHECK_TMP/flags"
  rel=${f#"$ROOT"/}
  args=("${flags[@]}" -fsyntax-only -w -x c++)  # -x c++: a header is compiled as a TU of its own
  if [ -n "$pch" ]; then  # the first PCH whose header the preprocessor really reaches (-M: the whole include tree)
    deps=$($CXX "${flags[@]}" -M -x c++ "$f" 2>/dev/null || true)
    for h in "${PCHS[@]}"; do
      p=$CHECK_TMP/${h//\//_}.pch
      if [ -f "$p" ] && [[ $deps == *"/$h "* || $deps == *"/$h" ]]; then args+=(-include-pch "$p"); break; fi
    done
  fi
  t0=${EPOCHREALTIME/./}
  out=$($CXX "${args[@]}" "$f" 2>&1) && ok=1 || ok=0
  dt=$(( (${EPOCHREALTIME/./} - t0) / 100000 ))
  if [ "$ok" = 1 ]; then
    printf '  ok   %3d.%ds  %s\n' $((dt / 10)) $((dt % 10)) "$rel"
    exit 0
  fi
  # the compiler's first error: its line and what belongs to it (source line, caret), up to the next diagnostic
  first=$(printf '%s\n' "$out" | awk '!p && /(error|fatal error):/ {p=1}
    p { if (n > 0 && /^[^ ].*: (error|fatal error|warning|note):/) exit; print "        " $0; if (++n >= 6) exit }')
  printf '  FAIL %3d.%ds  %s\n%s\n' $((dt / 10)) $((dt % 10)) "$rel" "${first:-$out}"
  exit 1
fi

LIST=0
if [ "${1:-}" = "--list" ]; then LIST=1; shift; fi
PY=${PYTHON:-python}
[ -n "${PYTHON:-}" ] || [ ! -x "$ROOT/.venv/bin/python" ] || PY=$ROOT/.venv/bin/python
T0=$(date +%s)
CHECK_TMP=$(mktemp -d "${TMPDIR:-/tmp}/check_includes.XXXXXX")
export CHECK_TMP CXX ROOT
[ -n "${KEEP_TMP:-}" ] || trap 'rm -rf "$CHECK_TMP"' EXIT

# 1. the toolchain (one probe: clang, libc++'s headers and omp.h)
probe() {
  printf '#include <initializer_list>\n#include <omp.h>\n' \
    | $CXX -stdlib=libc++ -fopenmp -fsyntax-only -x c++ - >/dev/null 2>&1
}
if [ "$LIST" = 0 ] && ! probe; then
  say "installing ${APT_PKGS[*]} (apt-get, once; ~10 s)"
  SUDO=()
  [ "$(id -u)" = 0 ] || SUDO=(sudo -n)
  if ! command -v apt-get >/dev/null; then
    say "FAILED: no apt-get here; install clang $LLVM with libc++ $LLVM and libomp $LLVM ($CXX on PATH)"; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${APT_PKGS[@]}" > "$CHECK_TMP/apt.log" 2>&1; then
    # a fresh machine may have no package lists yet
    "${SUDO[@]}" apt-get update -q >> "$CHECK_TMP/apt.log" 2>&1 || true
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${APT_PKGS[@]}" >> "$CHECK_TMP/apt.log" 2>&1 \
      || { tail -n 20 "$CHECK_TMP/apt.log"; say "FAILED: apt-get install ${APT_PKGS[*]}"; exit 1; }
  fi
  probe || { say "FAILED: $CXX with -stdlib=libc++ -fopenmp does not work after installing"; exit 1; }
fi

# 2. setup.py's flags and sources, as for a CUDA build (CPU-only when the CUDA kernels cannot be built here)
(cd "$ROOT" && "$PY" - "$CHECK_TMP" > "$CHECK_TMP/setup.log" 2>&1 <<'EOF'
import inspect, os, runpy, sys, sysconfig
import setuptools

out = sys.argv[1]
for k in [k for k in os.environ if k.startswith("GPT2KERN_")]:  # none of the caller's build settings
    del os.environ[k]
os.environ["GPT2KERN_CUDA"] = "1"  # the CUDA kernels too, where they can be built here
kw = {}
setuptools.setup = lambda **k: kw.update(k)
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py", run_name="__main__")
ext = kw["ext_modules"][0]
from torch.utils import cpp_extension  # only now: it reads CUDA_HOME, which setup.py sets, at import

cxx = list(ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args)
flags = ["-stdlib=libc++", "-D_LIBCPP_REMOVE_TRANSITIVE_INCLUDES", "-DNDEBUG", "-fPIC"] + cxx
# BuildExtension's additions when it compiles (torch's -std unless the extension sets one)
flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=" + ext.name.split(".")[-1]]
if not any(f.startswith("-std=") for f in cxx):
    src = inspect.getsource(cpp_extension.BuildExtension)
    flags.append("-std=c++20" if "'c++20'" in src else "-std=c++17")
incs = list(ext.include_dirs) + [sysconfig.get_paths()["include"]]
if os.path.isdir(os.path.join(sys.exec_prefix, "include")):
    incs.append(os.path.join(sys.exec_prefix, "include"))
flags += ["-I" + os.path.abspath(d) for d in incs]
with open(os.path.join(out, "flags"), "w") as f:
    f.write("\n".join(flags) + "\n")
with open(os.path.join(out, "sources"), "w") as f:
    f.write("\n".join(os.path.abspath(s) for s in ext.sources) + "\n")
EOF
) || { cat "$CHECK_TMP/setup.log"; say "FAILED: could not read setup.py's flags (needs torch: PYTHON=...)"; exit 1; }
CUDA_BUILD=0
grep -q '/ops_cuda\.cpp$' "$CHECK_TMP/sources" && CUDA_BUILD=1
why_no_cuda=$(grep -m1 '^gpt2kern build:' "$CHECK_TMP/setup.log" | sed 's/^gpt2kern build: //')

# 3. the files: each is checked, or skipped with a reason
reason() {  # empty: check it; else why it is skipped
  local rel=${1#"$ROOT"/}
  case $rel in
    csrc/cpu/kernels/*.h) echo "kernel fragment: checked inside the isa_*.cpp TUs" ;;
    *.cu | *.cuh) echo "CUDA device code: nvcc refuses libc++ on x86, clang $LLVM's CUDA mode stops at CUDA 13" ;;
    csrc/cuda/*)
      [ "$CUDA_BUILD" = 1 ] || echo "setup.py would not build the CUDA kernels here ($why_no_cuda)" ;;
    *.cpp | *.cc | *.h | *.hpp) ;;
    *) echo "not C++" ;;
  esac
}
if [ $# -gt 0 ]; then
  files=()
  for f in "$@"; do
    [ -f "$f" ] || { say "FAILED: no such file: $f"; exit 1; }
    files+=("$(realpath "$f")")
  done
else
  mapfile -t files < <(cd "$ROOT" && LC_ALL=C find csrc -type f \
    \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) | LC_ALL=C sort | sed "s|^|$ROOT/|")
fi
check=() skipped=0
declare -A skips=()  # reason -> how many (a run prints one line per reason, --list one per file)
for f in "${files[@]}"; do
  r=$(reason "$f")
  if [ -n "$r" ]; then
    skipped=$((skipped + 1)) skips[$r]=$(( ${skips[$r]:-0} + 1 ))
    [ "$LIST" = 1 ] && printf '  skip   %s  (%s)\n' "${f#"$ROOT"/}" "$r"
  else
    check+=("$f")
    [ "$LIST" = 1 ] && printf '  check  %s\n' "${f#"$ROOT"/}"
  fi
done
[ "$LIST" = 1 ] && exit 0
JOBS=${JOBS:-$(nproc)}
say "${#check[@]} file(s) on their own with $CXX + libc++ $LLVM (no transitive includes), $JOBS jobs$(
  [ "$CUDA_BUILD" = 1 ] && echo ", as in a CUDA build" || echo "; CPU build only: $why_no_cuda")"
for r in "${!skips[@]}"; do printf '  skip %3d files: %s\n' "${skips[$r]}" "$r"; done | LC_ALL=C sort -k4
[ ${#check[@]} -gt 0 ] || exit 0

# 4. compile: the files that may reach a header in PCHS (by the text of their and their project headers'
# #includes; each child confirms with clang -M) once the PCHs are built, the others meanwhile.
mentions() {  # mentions FILE REGEX: FILE or a project header it includes ("...", followed by text) matches REGEX
  local -A seen=()
  local stack=("$1") f d inc
  while [ ${#stack[@]} -gt 0 ]; do
    f=${stack[-1]}; unset 'stack[-1]'
    [ -z "${seen[$f]:-}" ] || continue
    seen[$f]=1
    grep -qE "^[[:space:]]*#[[:space:]]*include[[:space:]]*<($2)>" "$f" && return 0
    while read -r inc; do
      for d in "$(dirname "$f")" "$ROOT/csrc"; do
        if [ -f "$d/$inc" ]; then stack+=("$(realpath "$d/$inc")"); break; fi
      done
    done < <(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$f")
  done
  return 1
}
light=() heavy=() heaviest=() pch_pids=()
declare -A need=()
for f in "${check[@]}"; do
  for h in "${PCHS[@]}" ""; do
    if [ -z "$h" ]; then light+=("$f"); break; fi
    if mentions "$f" "${h//./\\.}"; then
      need[$h]=1
      if mentions "$f" 'torch/extension\.h'; then heaviest+=("$f"); else heavy+=("$f"); fi  # the slowest first
      break
    fi
  done
done
heavy=("${heaviest[@]}" "${heavy[@]}")
mapfile -t FLAGS < "$CHECK_TMP/flags"
for h in "${PCHS[@]}"; do
  [ -n "${need[$h]:-}" ] || continue
  echo "#include <$h>" > "$CHECK_TMP/${h//\//_}"
  $CXX "${FLAGS[@]}" -w -x c++-header "$CHECK_TMP/${h//\//_}" -o "$CHECK_TMP/${h//\//_}.pch" \
    > "$CHECK_TMP/${h//\//_}.log" 2>&1 &
  pch_pids+=("$!:$h")
done
rc=0
if [ ${#light[@]} -gt 0 ]; then
  P=$(( JOBS - ${#pch_pids[@]} ))
  [ "$P" -ge 1 ] || P=1
  printf '%s\0' "${light[@]}" | xargs -0 -n1 -P"$P" bash "$0" --one || rc=1
fi
for ph in "${pch_pids[@]}"; do
  if ! wait "${ph%%:*}"; then
    h=${ph#*:}
    sed -n '1,12p' "$CHECK_TMP/${h//\//_}.log"
    say "FAILED: torch's headers ($h) do not parse with $CXX + libc++ $LLVM and setup.py's flags"
    exit 1
  fi
done
if [ ${#heavy[@]} -gt 0 ]; then
  printf '%s\0' "${heavy[@]}" | xargs -0 -I{} -P"$JOBS" bash "$0" --one {} pch || rc=1
fi
took=$(( $(date +%s) - T0 ))
if [ "$rc" = 0 ]; then
  say "OK: ${#check[@]} file(s) compile on their own, $skipped skipped (${took}s)"
else
  say "FAILED: a file above does not compile on its own with $CXX + libc++ (include what it uses) (${took}s)"
fi
exit "$rc"
