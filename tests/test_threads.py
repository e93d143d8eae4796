"""Threads: the kernels' results do not depend on how many threads split the work (chunks are taken from a shared
counter, csrc/cpu/parallel.h), and gpt2kern sets OpenMP's idle threads to sleep (OMP_WAIT_POLICY) when imported
before torch, never over the user's own setting."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import plant_outliers

from gpt2kern import ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("M", [1, 7, 130])
def test_results_are_the_same_at_any_thread_count(isa, threads, M):
    g = torch.Generator().manual_seed(M)
    x = plant_outliers(torch.randn(M, 96, generator=g))
    w, b = torch.randn(96, 200, generator=g), torch.randn(200, generator=g)
    q, k, v = (torch.randn(2, 3, M, 16, generator=g) for _ in range(3))
    out = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        out.append((ops.conv1d(x, ops.pack(w), b, "gelu_new", out_features=200),
                    ops.attention(q, k, v, None, None, 0.25, 0, True)))
    for o in out[1:]:
        assert torch.equal(o[0], out[0][0]) and torch.equal(o[1], out[0][1])


def _policy(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    e.update(env, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_omp_wait_policy():
    assert _policy("import gpt2kern, torch") == "PASSIVE"
    assert _policy("import gpt2kern", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stands
    assert _policy("import torch, gpt2kern") == "None"  # too late to matter: left alone
