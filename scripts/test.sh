#!/usr/bin/env bash
# The test command: set up the environment if needed (scripts/env.sh: only what is missing or out of date), then
# the whole suite. CI (.ci/run) runs this after scripts/check_includes.sh, then the op and model tests again on an
# ASan + UBSan build (scripts/asan.sh); this script runs neither.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "test.sh: python -m pytest -q $* (the whole suite: about 8 minutes on 2 cores)"
python -m pytest -q "$@"
