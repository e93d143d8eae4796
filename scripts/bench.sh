#!/usr/bin/env bash
# The main job: set up the environment if needed (scripts/env.sh), then `gpt2kern bench` on the offline default model
# (random:distilgpt2): roofline inputs, every kernel vs torch, prefill and decode vs HF eager, parity.
# Extra arguments go to `gpt2kern bench` (e.g. --model DIR --reps 9 --json out.json --plot out.png).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "bench.sh: gpt2kern bench $* (several minutes; a progress bar when stderr is a terminal)"
python -m gpt2kern bench "$@"
