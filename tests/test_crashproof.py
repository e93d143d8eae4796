"""Crash-proof boundary: every public op and entry point, given bad input, raises a Python exception with a clear
and whole message — never a segfault, abort or silent garbage, on CPU and on CUDA. The cases
(tests/crashproof_cases.py) run in a subprocess, so a crash is a test failure naming the case, not a dead test run;
after a crash the remaining cases run in a fresh subprocess. A hypothesis fuzz of the ops' arguments
(tests/crashproof_fuzz.py) runs in a subprocess too. The CUDA twins (names with "cuda": bench/gpu_check.sh runs
them) skip without a GPU."""
import os
import subprocess
import sys

import pytest
from conftest import needs_cuda

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ_EXAMPLES = {"cpu": 300, "cuda": 300}  # a few seconds each (the CUDA test step has ~140 s for every CUDA test)


def _run_all(device="cpu"):
    """Every case of `device`'s list, in as few subprocesses as crashes allow: {index: outcome line}."""
    results, start, restarts = {}, 0, 0
    while True:
        p = subprocess.run([sys.executable, os.path.join(HERE, "crashproof_cases.py"), "--device", device,
                            str(start)], capture_output=True, text=True, timeout=600)
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
        # the child died in a case (a crash), or left after one on purpose (an asynchronous CUDA fault: its context
        # is gone); anything else is a failure outside the cases
        after_fault = last is not None and results.get(last[0], "").startswith("FAIL after the call")
        if last is None or (last[0] in results and not after_fault) or restarts > 20:
            raise AssertionError(f"crashproof_cases.py --device {device} failed outside a case (rc {p.returncode}):\n"
                                 f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        restarts += 1
        if not after_fault:
            results[last[0]] = f"FAIL crashed (rc {p.returncode}): {p.stderr.strip()[-1500:]}"
        start = last[0] + 1


def _names(device):
    # building the lists is safe in-process (they only make tensors, the CUDA list's on the meta device, and a
    # random:tiny model); the calls run in the subprocess
    sys.path.insert(0, HERE)
    try:
        import crashproof_cases
        return [name for name, _, _ in crashproof_cases._cases(device, make_on="meta" if device == "cuda" else None)]
    finally:
        sys.path.remove(HERE)


NAMES, CUDA_NAMES = _names("cpu"), _names("cuda")


@pytest.fixture(scope="module")
def outcomes():
    return _run_all("cpu")


@pytest.fixture(scope="module")
def cuda_outcomes():
    return _run_all("cuda")


def _count(outcomes, names):
    assert len(outcomes) == len(names)
    print(f"{len(names)} bad-input cases, "
          f"{sum(o.startswith('ok ') and 'returned' not in o for o in outcomes.values())} raised a clear exception")


def test_count(outcomes):
    _count(outcomes, NAMES)


@pytest.mark.parametrize("i", range(len(NAMES)), ids=NAMES)
def test_bad_input_is_a_clean_exception(outcomes, i):
    outcome = outcomes.get(i, "FAIL never reached")
    assert outcome.startswith("ok"), f"{NAMES[i]}: {outcome}"


@needs_cuda
def test_count_cuda(cuda_outcomes):
    _count(cuda_outcomes, CUDA_NAMES)


@needs_cuda
@pytest.mark.parametrize("i", range(len(CUDA_NAMES)), ids=CUDA_NAMES)
def test_bad_input_is_a_clean_exception_cuda(cuda_outcomes, i):
    """The op cases with CUDA tensors, CPU/CUDA mixes, the CUDA-only decode ops and the model, generate and
    CudaGraphDecoder on CUDA: a clean, whole exception, never a crash or an asynchronous fault."""
    outcome = cuda_outcomes.get(i, "FAIL never reached")
    assert outcome.startswith("ok"), f"{CUDA_NAMES[i]}: {outcome}"


def _fuzz(device):
    p = subprocess.run([sys.executable, os.path.join(HERE, "crashproof_fuzz.py"), device,
                        str(FUZZ_EXAMPLES[device])], capture_output=True, text=True, timeout=600)
    if p.returncode != 0 or "DONE" not in p.stdout:
        last = [ln for ln in p.stdout.splitlines() if ln.startswith("EXAMPLE ")][-1:]
        how = "crashed" if p.returncode < 0 else "failed"  # (a signal: the last call is the one that crashed)
        raise AssertionError(f"crashproof_fuzz.py {device} {how} (rc {p.returncode}; last call: "
                             f"{last[0] if last else 'none'}):\n{p.stdout[-1500:]}\n{p.stderr[-6000:]}")


def test_fuzz_bad_arguments():
    """Random shapes, dtypes and optional arguments for every op (the decode ops refuse CPU tensors): each call
    returns on its tensors' device or raises TypeError/ValueError/IndexError with a whole message."""
    _fuzz("cpu")


@needs_cuda
def test_fuzz_bad_arguments_cuda():
    """The same fuzz on CUDA, with CPU tensors now and then among the CUDA ones, the CUDA-only decode ops' split
    counts, counters (refused with reduced-mode weights), caches, slots and lengths, both decode attention kernels
    (flash-decoding and the general one: two query rows, odd head dims, unaligned keys), and bad ids checked on the
    device."""
    _fuzz("cuda")


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
