"""bench/compare_llamacpp.py: its argument errors (a real comparison needs a llama.cpp build; with LLAMA_BENCH and
LLAMA_GGUF set to one, the whole comparison runs too)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_llamacpp.py"


@pytest.mark.parametrize("args, needle", [
    (["--llama-bench", "/nonexistent/llama-bench", "--gguf", str(SCRIPT)], "--llama-bench"),
    (["--llama-bench", sys.executable, "--gguf", "/nonexistent.gguf"], "--gguf"),
    (["--llama-bench", sys.executable, "--gguf", str(SCRIPT), "--rounds", "0"], "--rounds"),
])
def test_argument_errors(args, needle):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


@pytest.mark.skipif(not (os.environ.get("LLAMA_BENCH") and os.environ.get("LLAMA_GGUF")),
                    reason="set LLAMA_BENCH and LLAMA_GGUF to a llama-bench binary and the model's f32 GGUF")
def test_comparison_runs(tmp_path):
    out = tmp_path / "l.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--llama-bench", os.environ["LLAMA_BENCH"], "--gguf",
                        os.environ["LLAMA_GGUF"], "--rounds", "1", "--json", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["results"]
    assert all(v > 0 for row in res.values() for v in row.values()) and len(res) == 3
