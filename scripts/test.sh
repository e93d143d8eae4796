#!/usr/bin/env bash
# The test command: set up the environment if needed (scripts/env.sh: only what is missing or out of date), then
# the whole suite. CI (.ci/run) runs this, then the op and model tests again on an ASan + UBSan build
# (scripts/asan.sh), which this script does not run.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "test.sh: python -m pytest -q $* (the whole suite: about 8 minutes on 2 cores)"
python -m pytest -q "$@"
