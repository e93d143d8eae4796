"""_C.so must use the process's shared libstdc++ (the one torch loaded), never a private copy.

A compiler that links libstdc++ statically (`-static-libstdc++`, as some toolchain images' `CXX` does) puts its own
locale facets into the extension; the first `ostream << int64` in an error message then uses facets whose ids do
not match the shared libstdc++'s: a crash on one machine, a message cut at its first number on another. setup.py
links with LINK_ARGS (which fixes such a compiler), probes the compiler before building and checks the built file
after linking; where the shared libstdc++ cannot be had, it refuses with one line (`refusal`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

# Named among the user's arguments, so before the driver's own libraries: the shared libstdc++ satisfies every
# reference and the static archive a `-static-libstdc++` driver adds after them contributes nothing.
LINK_ARGS = ["-lstdc++"]

# std::locale's own members: defined only where libstdc++ itself was linked in
_LOCALE = "_ZNSt6locale"
_PROBE_SOURCE = '#include <sstream>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n'


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def problem(so_path: str) -> str | None:
    """Why the shared object at so_path does not use the shared libstdc++ (None when it does). Tools missing
    (readelf, nm: binutils, which every gcc needs) also give None: nothing could be checked."""
    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    if readelf is None or nm is None:
        return None
    needed = _run([readelf, "-d", so_path]).stdout
    locale = 0
    for args in (["-D", "--defined-only"], ["--defined-only"]):  # dynamic symbols, then the full table if kept
        locale = max(locale, sum(line.split()[-1].startswith(_LOCALE)
                                 for line in _run([nm, *args, so_path]).stdout.splitlines() if line.strip()))
    why = []
    if "[libstdc++.so.6]" not in needed:
        why.append("it does not need libstdc++.so.6")
    if locale:
        why.append(f"it defines {locale} std::locale symbols of its own")
    return " and ".join(why) or None


def probe(driver: list[str], link_args: list[str] = LINK_ARGS) -> str | None:
    """Link a one-function shared object with the C++ driver (and link_args) as setup.py links _C.so: None when it
    uses the shared libstdc++, else why not (or why it could not be linked)."""
    with tempfile.TemporaryDirectory(prefix="gpt2kern-libstdcxx-") as d:
        src, out = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE_SOURCE)
        try:
            r = _run([*driver, "-fPIC", "-shared", src, "-o", out, *link_args])
        except OSError as e:
            return f"it could not be run ({e.strerror})"
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            return f"it could not link a shared object ({last})"
        return problem(out)


def alternative(driver: list[str]) -> str | None:
    """`CXX=... CC=...` for another compiler here that links the shared libstdc++ (None when there is none)."""
    mine = os.path.realpath(shutil.which(driver[0]) or driver[0])
    seen = {mine}
    for name in ("/usr/bin/g++", shutil.which("g++"), "/usr/bin/c++", shutil.which("c++")):
        path = name and shutil.which(name)
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if probe([path]) is None:
            cc = os.path.join(os.path.dirname(path), "gcc" if os.path.basename(path) == "g++" else "cc")
            return f"CXX={path}" + (f" CC={cc}" if os.path.exists(cc) else "")
    return None


def refusal(driver: list[str], why: str) -> str:
    """The one line setup.py stops with."""
    return (f"gpt2kern build: the C++ compiler `{' '.join(driver)}` links a private libstdc++ into _C.so ({why}), "
            f"so its error messages would crash or be cut short; build with "
            f"{alternative(driver) or 'CXX=<a g++ that links the shared libstdc++>'}")


if __name__ == "__main__":
    # python buildtools/libstdcxx.py DRIVER...: exit 0 when setup.py can build with it; else the reason on stderr
    # and, where one exists, the `CXX=... CC=...` to use instead on stdout (exit 1; exit 2 when there is none)
    import sys

    why = probe(sys.argv[1:])
    if why:
        print(f"{' '.join(sys.argv[1:])}: {why}", file=sys.stderr)
        other = alternative(sys.argv[1:])
        if other:
            print(other)
        sys.exit(1 if other else 2)
