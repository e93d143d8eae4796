"""_C.so uses the process's shared libstdc++ whatever the compiler does (buildtools/libstdcxx.py, setup.py).

The compilers here are wrappers like the GPU image's `CXX`: g++ with `-static-libstdc++` added to every link. Built
through one, the extension once defined its own std::locale and every error message that formats a number
stopped at that number (on the GPU machine: a SIGSEGV)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "buildtools"))
import libstdcxx  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("readelf") is None,
                                reason="needs g++ and binutils")

# links libstdc++ statically, as the GPU image's compiler did
STATIC = 'exec g++ "$@" -static-libstdc++\n'
# and defeats the fix: every -lstdc++ names the static archive
HOPELESS = 'args=""; for a in "$@"; do [ "$a" = -lstdc++ ] && a=-l:libstdc++.a; args="$args $a"; done\n' \
           'exec g++ $args -static-libstdc++\n'


def wrapper(tmp_path, name, body):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def source_copy(tmp_path):
    """What setup.py builds from, without a built extension."""
    dst = tmp_path / "src"
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    for name in ("buildtools", "csrc", "gpt2kern"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


def build(src, cxx, timeout):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2KERN_")}
    # the CPU kernels at -O1: what is tested here is the link, not the code
    env.update(CXX=cxx, CC=cxx, GPT2KERN_NO_CUDA="1", GPT2KERN_DEBUG="1", MAX_JOBS=str(os.cpu_count() or 2))
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_probe_sees_a_private_libstdcxx_and_the_link_args_fix_it(tmp_path):
    static = wrapper(tmp_path, "g++-static", STATIC)
    why = libstdcxx.probe([static], link_args=[])
    assert why is not None and "does not need libstdc++.so.6" in why and "std::locale symbols" in why
    assert libstdcxx.probe([static]) is None
    assert libstdcxx.probe(["g++"]) is None


def test_probe_of_a_missing_compiler_says_why(tmp_path):
    assert "could not be run" in libstdcxx.probe([str(tmp_path / "no-such-g++")])


def test_a_compiler_that_defeats_the_fix_is_refused_in_one_line_before_compiling(tmp_path):
    hopeless = wrapper(tmp_path, "g++-hopeless", HOPELESS)
    r = build(source_copy(tmp_path), hopeless, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gpt2kern build: the C++ compiler") and hopeless in last, r.stderr[-2000:]
    assert "links a private libstdc++ into _C.so" in last and "CXX=" in last
    assert not list((tmp_path / "src").rglob("*.o")), "refused only after compiling"


def test_built_through_a_static_libstdcxx_compiler_the_errors_keep_their_numbers(tmp_path):
    src = source_copy(tmp_path)
    r = build(src, wrapper(tmp_path, "g++-static", STATIC), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (so,) = (src / "gpt2kern").glob("_C*.so")
    assert libstdcxx.problem(str(so)) is None
    # the errors that format integers, from the built copy (a signal death here is the GPU machine's crash)
    check = """
import torch, gpt2kern
from gpt2kern import ops
assert gpt2kern.__file__.startswith(%r), gpt2kern.__file__
for call, want in ((lambda: ops.conv1d(torch.randn(2, 8), torch.randn(7, 4)), "must be [8, 4], got [7, 4]"),
                   (lambda: ops.embedding(torch.tensor([[0, 99]]), torch.randn(10, 4), torch.randn(8, 4),
                                       torch.tensor([[0, 1]])), "contains 99, outside the vocabulary [0, 10)")):
    try:
        call()
    except (ValueError, IndexError) as e:
        assert want in str(e), str(e)
    else:
        raise AssertionError("no error")
print("ok")
""" % str(src)
    r = subprocess.run([sys.executable, "-c", check], cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout, r.stderr[-2000:])
