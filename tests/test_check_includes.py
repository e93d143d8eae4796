"""scripts/check_includes.sh: it covers every file in csrc/, and it flags a file that uses what it does not include."""
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_includes.sh"
CXX = "clang++-19"  # the script's LLVM version


def run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2KERN_")}
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@lru_cache(maxsize=None)
def toolchain_missing():
    """Why the script's toolchain is not usable here (it installs it itself; the tests do not), or None."""
    if shutil.which(CXX) is None:
        return f"{CXX} is not installed (scripts/check_includes.sh installs it; CI runs it before the tests)"
    r = subprocess.run([CXX, "-stdlib=libc++", "-fopenmp", "-fsyntax-only", "-x", "c++", "-"],
                       input="#include <initializer_list>\n#include <omp.h>\n", capture_output=True, text=True)
    if r.returncode != 0:
        return f"{CXX} is here but libc++/libomp are not (scripts/check_includes.sh installs them): {r.stderr[:200]}"
    return None


def test_lists_every_csrc_file():
    """Every .cpp/.cu/.h/.cuh under csrc/ is checked or skipped with a reason, each .cpp is checked (ops_cuda.cpp
    only needs the CUDA build to be possible here), and setup.py compiles nothing outside that list."""
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)
    r = run("--list", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s+(check|skip)\s+(\S+)(?:\s+\((.*)\))?$", line)
        if m:
            listed[m.group(2)] = (m.group(1), m.group(3))
    on_disk = {str(p.relative_to(ROOT)) for ext in ("cpp", "cu", "h", "cuh")
               for p in (ROOT / "csrc").rglob(f"*.{ext}")}
    assert set(listed) == on_disk, r.stdout
    for f, (what, why) in listed.items():
        if f.endswith(".cpp") and what == "skip":
            assert f == "csrc/cuda/ops_cuda.cpp" and why.startswith("setup.py would not build the CUDA kernels"), \
                (f, why)
    for f in ("csrc/cpu/dispatch.cpp", "csrc/ops.cpp", "csrc/common/op_args.h", "csrc/cpu/kernel_table.h"):
        assert listed[f][0] == "check", (f, listed[f])

    # setup.py's sources (as for a CUDA build: the most it compiles) all lie under csrc/, so all are listed
    code = ("import runpy, sys, setuptools; kw = {}; setuptools.setup = lambda **k: kw.update(k); "
            "sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__'); "
            "print('\\n'.join(kw['ext_modules'][0].sources))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2KERN_")}
    s = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, GPT2KERN_CUDA="1"),
                       capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    sources = [os.path.relpath(p, ROOT) for p in s.stdout.split()]
    assert sources and all(p in listed for p in sources), (sources, sorted(listed))


MISSING = """// A braced range-for needs std::initializer_list. libstdc++'s <atomic>/<cstring> happen to pull it in,
// so g++ accepts this file (as g++ 12 accepted csrc/cpu/dispatch.cpp before 440786e); libc++ without
// transitive includes does not.
#include <atomic>
#include <cstring>
int pick(const char* want) {
  int i = 0;
  for (const char* isa : {"avx512", "avx2", "generic"}) {
    if (!std::strcmp(isa, want)) return i;
    ++i;
  }
  return -1;
}
"""


@pytest.mark.skipif(toolchain_missing() is not None, reason=str(toolchain_missing()))
def test_flags_a_missing_include(tmp_path):
    bad = tmp_path / "missing_include.cpp"
    bad.write_text(MISSING)
    good = tmp_path / "with_include.cpp"
    good.write_text(MISSING.replace("#include <cstring>", "#include <cstring>\n#include <initializer_list>"))
    # a header on its own: std::vector without <vector> (fine in every TU that includes <vector> before it)
    header = tmp_path / "missing_include.h"
    header.write_text("#pragma once\n#include <cstdint>\n"
                      "inline int64_t n(const std::vector<int>& v) { return v.size(); }\n")
    if shutil.which("g++"):  # the build's compiler accepts the bad TU: only the check can catch it
        g = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", str(bad)], capture_output=True, text=True)
        assert g.returncode == 0, g.stderr
    r = run(str(bad), str(good), str(header))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert re.search(rf"^\s+FAIL\s.*{re.escape(str(bad))}$", r.stdout, re.M), out
    assert "include <initializer_list>" in out, out  # the compiler's first error, shown
    assert re.search(rf"^\s+ok\s.*{re.escape(str(good))}$", r.stdout, re.M), out
    assert re.search(rf"^\s+FAIL\s.*{re.escape(str(header))}$", r.stdout, re.M), out
    assert "FAILED" in r.stdout.splitlines()[-1], out
