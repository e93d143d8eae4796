#!/usr/bin/env bash
# The GPU check, in one go on a GPU machine (H100/H200 with torch, transformers, nvcc and ninja; no internet; this
# repository copied in), inside 8 minutes:
#   1. build the extension in place (for this GPU's arch)
#   2. the CUDA parity tests (every test with a cuda parameter, and tests/test_cuda.py)
#   3. bench/gpu_bench.py: kernels vs torch, prefill/decode vs HF eager, decoder with and without CUDA graphs
#   4. compute-sanitizer memcheck, racecheck and initcheck on a small subset of the CUDA tests
#   5. `python -m gpt2kern.bench --device cuda` (the project's bench CLI, where it supports CUDA)
# Each step runs under `timeout` within what is left of the 8 minutes; full logs and JSON go to $OUT (default
# bench/out/); a short table comes last. Exit status: 0 when the build and the CUDA tests passed and no sanitizer
# reported an error (a sanitizer step cut off by its time limit is marked INCOMPLETE in the table, not failed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # seconds for everything (8 min less a margin)
START=$SECONDS
SUMMARY=()

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MAX_SECONDS CMD...: run CMD with a timeout of min(MAX_SECONDS, time left), log to $OUT/NAME.log
step() {
  local name=$1 max=$2 lim t0 rc
  shift 2
  lim=$(left)
  [ "$lim" -gt "$max" ] && lim=$max
  if [ "$lim" -lt 15 ]; then
    SUMMARY+=("$(printf '%-18s %-10s %5s' "$name" "no time" "-")")
    return 124
  fi
  t0=$SECONDS
  echo "== $name (limit ${lim}s) ==" >&2
  timeout -k 5 "$lim" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timeout"
  SUMMARY+=("$(printf '%-18s %-10s %4ss' "$name" "$status" "$((SECONDS - t0))")")
  tail -n 3 "$OUT/$name.log" >&2
  return $rc
}

{
  nvidia-smi || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
} >"$OUT/env.log" 2>&1

step build 240 python setup.py build_ext --inplace
BUILD_RC=$?
python -c "import gpt2kern; assert gpt2kern.ops.has_cuda(), 'built without CUDA'" >>"$OUT/build.log" 2>&1 || BUILD_RC=1

TEST_RC=1
if [ $BUILD_RC -eq 0 ]; then
  step cuda_tests 150 python -m pytest -q -rs -k cuda tests/ --junitxml="$OUT/cuda_tests.xml"
  TEST_RC=$?
  step gpu_bench 150 python bench/gpu_bench.py --json "$OUT/gpu_bench.json"

  SAN=$(command -v compute-sanitizer || true)
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SAN="$d/bin/compute-sanitizer"
  done
  # the kernels' every branch on small shapes: prefill/decode attention, masks, GEMM/GEMV/split-K, layernorm...
  SUBSET=(tests/test_attention.py tests/test_matmul.py tests/test_layernorm.py tests/test_gelu.py
          tests/test_embedding.py -k "cuda and not 1024 and not 50257 and not opcheck")
  SAN_RC=0
  # sanitize NAME MAX TOOL TEST_ARGS...: a report (exit 99) or any other failure fails the check; a timeout is
  # marked INCOMPLETE (the tools slow the tests 10-100x; what ran before the cut was still checked)
  sanitize() {
    local name=$1 max=$2 tool=$3 rc
    shift 3
    step "$name" "$max" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 \
      python -m pytest -q -x "$@"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      SUMMARY[-1]="${SUMMARY[-1]/timeout   /INCOMPLETE}"
    elif [ $rc -ne 0 ]; then
      SAN_RC=1
    fi
  }
  if [ -n "$SAN" ]; then
    sanitize memcheck 75 memcheck "${SUBSET[@]}"
    sanitize racecheck 60 racecheck tests/test_attention.py tests/test_matmul.py \
      -k "cuda and not 1024 and not 50257 and not opcheck"
    sanitize initcheck 45 initcheck tests/test_layernorm.py tests/test_attention.py -k "cuda and not 1024 and not opcheck"
  else
    SUMMARY+=("$(printf '%-18s %-10s %5s' sanitizer "not found" "-")")
  fi
  step bench_cli 120 python -m gpt2kern.bench --device cuda --quick --reps 5 --json "$OUT/bench.json"
fi

python - "$OUT" <<'EOF' >"$OUT/summary.txt" 2>&1 || true
import json, os, sys
out = sys.argv[1]
p = os.path.join(out, "gpu_bench.json")
if not os.path.exists(p):
    print("(no gpu_bench.json)")
    sys.exit()
r = json.load(open(p))
print(f"{r.get('device')}  torch {r.get('torch')}")
ks = r.get("kernels", [])
if ks:
    worst = min(ks, key=lambda k: k["speedup"])
    print(f"kernels: {sum(k['speedup'] >= 1.0 for k in ks)}/{len(ks)} at >= 1.0x torch; "
          f"slowest: {worst['kernel']} {worst['speedup']:.2f}x")
    for k in ks:
        print(f"  {k['kernel']:<36} {k['speedup']:5.2f}x  ({k['ours_us']:.1f} vs {k['torch_us']:.1f} us)")
e = r.get("e2e", {})
if "prefill_T512" in e:
    x = e["prefill_T512"]
    print(f"prefill T=512: {x['speedup']:.2f}x HF eager (target 1.5x)  max|dlogits| {x['max_abs_dlogits']:.2g}")
for B, target in ((1, 10), (32, 3)):
    x = e.get(f"decode_B{B}")
    if x:
        best = max(v for k, v in x.items() if k.endswith("speedup"))
        print(f"decode B={B}: HF {x['hf_ms_per_step']:.2f} ms/step; graph decoder "
              f"{x.get('decoder_cuda_graph_ms_per_step', float('nan')):.3f} ms/step; best {best:.1f}x HF "
              f"(target {target}x); tokens equal HF: {x.get('decoder_tokens_equal_hf_24')}")
EOF

{
  echo
  echo "== gpu_check summary ($((SECONDS - START))s, logs in $OUT) =="
  printf '%s\n' "${SUMMARY[@]}"
  cat "$OUT/summary.txt"
} | tee "$OUT/table.txt"
[ $BUILD_RC -eq 0 ] && [ $TEST_RC -eq 0 ] && [ "${SAN_RC:-0}" -eq 0 ]
