#!/usr/bin/env bash
# check_format.sh — every C++ and CUDA source in csrc/ (*.cpp, *.h, *.cu, *.cuh) formatted as .clang-format says,
# checked with clang-format 19 (--dry-run -Werror: nothing is rewritten). The version is pinned because another
# clang-format release may lay out the same code differently.
#
# Usage: bash scripts/check_format.sh          check (CI: .ci/run); exit status 1 and clang-format's diagnostics
#                                              for each file that differs
#        bash scripts/check_format.sh --fix    rewrite the files in place instead
# clang-format-19 is installed with apt-get when missing (Debian/Ubuntu, as root or with sudo -n). CLANG_FORMAT
# names another binary.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CF=${CLANG_FORMAT:-clang-format-19}
say() { echo "check_format: $*" >&2; }

if ! command -v "$CF" >/dev/null; then
  command -v apt-get >/dev/null || { say "FAILED: no $CF and no apt-get to install it"; exit 1; }
  say "installing clang-format-19 (apt-get, once)"
  SUDO=()
  [ "$(id -u)" = 0 ] || SUDO=(sudo -n)
  export DEBIAN_FRONTEND=noninteractive
  LOG=$(mktemp "${TMPDIR:-/tmp}/check_format.XXXXXX")
  trap 'rm -f "$LOG"' EXIT
  if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends clang-format-19 > "$LOG" 2>&1; then
    # a fresh machine may have no package lists yet
    "${SUDO[@]}" apt-get update -q >> "$LOG" 2>&1 || true
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends clang-format-19 >> "$LOG" 2>&1 \
      || { tail -n 20 "$LOG"; say "FAILED: apt-get install clang-format-19"; exit 1; }
  fi
fi

mapfile -t FILES < <(find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort)
if [ "${1:-}" = "--fix" ]; then
  "$CF" -i "${FILES[@]}"
  say "formatted ${#FILES[@]} files"
  exit 0
fi
if ! "$CF" --dry-run -Werror "${FILES[@]}"; then
  say "FAILED: files above differ from .clang-format (bash scripts/check_format.sh --fix rewrites them)"
  exit 1
fi
say "${#FILES[@]} files formatted as .clang-format says"
