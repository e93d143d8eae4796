"""The command line answers --help and argument errors without importing torch or transformers (they take seconds),
and the lazy package still gives the same public API."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="120")
HEAVY = ("torch", "transformers", "numpy", "gpt2kern._C", "gpt2kern.model", "gpt2kern.ops")

PROBE = """
import json, sys
from gpt2kern.cli import main as cli
rc = cli.main(sys.argv[1:])
print(json.dumps(dict(rc=rc, heavy=[m for m in {heavy!r} if m in sys.modules])))
"""


def probe(*argv):
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r


@pytest.mark.parametrize("argv, rc", [
    (["--help"], 0),
    ([], 0),  # plain `gpt2kern`: the help
    (["generate", "--help"], 0),
    (["trace", "--help"], 0),
    (["parity", "--help"], 0),
    (["bench", "--help"], 0),
    (["generate"], 2),  # missing prompt
    (["generate", "x", "--bogus"], 2),
    (["generate", "x", "--temperature", "0"], 2),
    (["generate", "x", "--top-p", "2"], 2),
    (["generate", "x", "--threads", "0"], 2),
    (["next", "x", "--top-k", "0"], 2),
    (["parity", "--seq-len", "0"], 2),
    (["bench", "--reps", "3"], 2),
    (["generate", "x", "--device", "tpu"], 2),
    (["generate", b"\xff\xfe"], 2),  # not UTF-8 (argv bytes): refused before any model is loaded
    (["next", b"caf\xe9"], 2),
    (["trace", b"\xed\xa0\x80"], 2),
    (["generate", "x", "--threads", str(10 ** 6)], 2),
    (["generate", "x", "--sample", "--seed", str(2 ** 64)], 2),
    (["generate", "x", "--temperature", "1e-9"], 2),
    (["parity", "--batch", "1000"], 2),
])
def test_help_and_argument_errors_import_no_torch(argv, rc):
    res, r = probe(*argv)
    assert res["rc"] == rc, r.stderr
    assert res["heavy"] == [], f"{argv} imported {res['heavy']}"
    if rc == 2:
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_answers_quickly():
    """`python -m gpt2kern --help` end to end, interpreter start included (it took 10-12 s when it imported torch).
    The bound is loose for a busy 2-core CI machine; the import test above is the exact check."""
    best = min(_timed([sys.executable, "-m", "gpt2kern", "--help"]) for _ in range(3))
    assert best < 2.0, f"--help took {best:.2f} s"


def _timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout, r.stderr
    return time.perf_counter() - t


def test_lazy_package_keeps_its_api():
    code = """
import sys, types
import gpt2kern
assert 'torch' not in sys.modules
from gpt2kern.decode.generate import last_fallback_reason   # the submodule first: gpt2kern.generate stays the function
import gpt2kern.model.dropin, gpt2kern.model.loading, gpt2kern.model.steps
assert callable(gpt2kern.generate) and not isinstance(gpt2kern.generate, types.ModuleType), gpt2kern.generate
assert gpt2kern.generate is gpt2kern.generate.__globals__['generate']
assert gpt2kern.generate_fallback_reason is last_fallback_reason
from gpt2kern import ops, optimize, restore, load, tracing, fallback_reason, is_optimized, generate
assert generate is gpt2kern.generate and ops.isa() in ('avx512', 'avx2', 'generic')
assert gpt2kern.model.loading.random_config('tiny').vocab_size == 99 and gpt2kern.model.steps.ATOL > 0
assert set(gpt2kern.__all__) <= set(dir(gpt2kern))
try:
    gpt2kern.no_such_name
except AttributeError as e:
    assert 'no_such_name' in str(e)
else:
    raise AssertionError('no AttributeError')
m, tok = load('random:tiny')
import torch
out = gpt2kern.generate(m, torch.tensor([[1, 2, 3]]), max_new_tokens=2, eos_token_id=[])
assert out.shape == (1, 5)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
