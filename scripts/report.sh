#!/usr/bin/env bash
# The main job: set up the environment if needed, build, print the parity and speed report on the offline default
# model (random:distilgpt2) vs HF eager and torch. Extra arguments go to `python -m gpt2kern.report`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m gpt2kern.report "$@"
