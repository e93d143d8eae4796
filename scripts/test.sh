#!/usr/bin/env bash
# The test command: set up the environment from scratch if needed, build, run the whole parity suite.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q "$@"
