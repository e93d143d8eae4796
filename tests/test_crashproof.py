"""Crash-proof boundary: every public op and entry point, given bad input, raises a Python exception with a clear
message — never a segfault, abort or silent garbage. The cases (tests/crashproof_cases.py) run in a subprocess, so
a crash is a test failure naming the case, not a dead test run; after a crash the remaining cases run in a fresh
subprocess."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_all():
    results, start, crashes = {}, 0, 0
    while True:
        p = subprocess.run([sys.executable, os.path.join(HERE, "crashproof_cases.py"), str(start)],
                           capture_output=True, text=True, timeout=600)
        last = None
        for line in p.stdout.splitlines():
            if line.startswith("CASE "):
                _, i, name = line.split(" ", 2)
                last = (int(i), name)
            elif line.startswith("RESULT "):
                _, i, outcome = line.split(" ", 2)
                results[int(i)] = outcome
        if p.returncode == 0 and "DONE" in p.stdout:
            return results
        if last is None or last[0] in results or crashes > 20:
            raise AssertionError(f"crashproof_cases.py failed outside a case (rc {p.returncode}):\n"
                                 f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        crashes += 1
        results[last[0]] = f"FAIL crashed (rc {p.returncode}): {p.stderr.strip()[-1500:]}"
        start = last[0] + 1


@pytest.fixture(scope="module")
def outcomes():
    return _run_all()


def _names():
    # building the list is safe in-process (it only makes tensors and a random:tiny model); the calls run in the
    # subprocess
    sys.path.insert(0, HERE)
    try:
        import crashproof_cases
        return [name for name, _, _ in crashproof_cases._cases()]
    finally:
        sys.path.remove(HERE)


NAMES = _names()


def test_count(outcomes):
    assert len(outcomes) == len(NAMES)
    print(f"{len(NAMES)} bad-input cases, "
          f"{sum(o.startswith('ok ') and 'returned' not in o for o in outcomes.values())} raised a clear exception")


@pytest.mark.parametrize("i", range(len(NAMES)), ids=NAMES)
def test_bad_input_is_a_clean_exception(outcomes, i):
    outcome = outcomes.get(i, "FAIL never reached")
    assert outcome.startswith("ok"), f"{NAMES[i]}: {outcome}"


def test_gpt2kern_isa_env_is_honoured_or_warned():
    """The dispatcher's start-up choice: GPT2KERN_ISA forces a level this CPU supports; an unknown or unsupported
    one falls back to the best level with a warning, never a crash (SIGILL). One subprocess per value, together."""
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from gpt2kern import ops\n"
            "x = torch.randn(3, 70)\n"
            "y = ops.layer_norm(x, torch.ones(70), torch.zeros(70))\n"
            "assert torch.allclose(y, torch.nn.functional.layer_norm(x, (70,)), atol=1e-5)\n"
            "print(ops.isa(), ','.join(ops.supported_isas()))\n")
    procs = {isa: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=dict(os.environ, GPT2KERN_ISA=isa))
             for isa in ("avx512", "avx2", "generic", "nonsense")}
    for isa, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"GPT2KERN_ISA={isa}: {err[-3000:]}"
        got, supported = out.split()
        if isa in supported.split(","):
            assert got == isa
        else:
            assert got == supported.split(",")[0] and "not available" in err
