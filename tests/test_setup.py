"""The build's choices (setup.py) and the set-up script's promise not to rebuild an up-to-date build."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import no_gpu

ROOT = Path(__file__).resolve().parents[1]


def setup_py(*args, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2KERN_")}
    env.update(env_vars)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def decision(r):
    return next((line for line in r.stderr.splitlines() if line.startswith("gpt2kern build:")), r.stderr)


@no_gpu
def test_no_gpu_builds_cpu_kernels_only():
    r = setup_py("--name")
    assert r.returncode == 0 and r.stdout.strip() == "gpt2kern", r.stderr
    assert "CPU kernels only: no GPU visible" in decision(r)


def test_cuda_on_request():
    r = setup_py("--name", GPT2KERN_CUDA="1")
    assert r.returncode == 0, r.stderr
    if torch.version.cuda is not None and "cannot be built here" not in decision(r):
        assert "CPU and CUDA kernels (GPT2KERN_CUDA=1)" in decision(r)
    else:
        assert "cannot be built here" in decision(r)


@pytest.mark.parametrize("env", [dict(GPT2KERN_NO_CUDA="1"), dict(GPT2KERN_CUDA="0")])
def test_cuda_off(env):
    r = setup_py("--name", **env)
    assert r.returncode == 0 and "CUDA kernels off" in decision(r), r.stderr


def test_require_cuda_refuses_a_cpu_only_build():
    r = setup_py("--name", GPT2KERN_REQUIRE_CUDA="1", GPT2KERN_NO_CUDA="1")
    assert r.returncode != 0 and "GPT2KERN_REQUIRE_CUDA=1 but the CUDA kernels would not be built" in r.stderr


def test_no_ext_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['setup.py', '--name']; "
                        "runpy.run_path('setup.py'); assert 'torch' not in sys.modules"],
                       cwd=ROOT, env=dict(os.environ, GPT2KERN_NO_EXT="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "gpt2kern" and "gpt2kern build:" not in r.stderr, r.stderr


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="runs scripts/env.sh on this checkout's .venv: only under scripts/test.sh")
def test_env_sh_again_rebuilds_nothing():
    """scripts/env.sh right after a set-up (as test.sh after bench.sh): every stage is skipped, the build too."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    r = subprocess.run(["bash", "scripts/env.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for stage in ("[1/5] .venv exists", "[2/5] torch", "[3/5] dependencies", "[4/5] build: up to date",
                  "[5/5] gpt2kern is installed", "env.sh: ready"):
        assert stage in out, out
    assert "compiling" not in out and "Collecting" not in out, out
