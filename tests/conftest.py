"""Shared test setup: tolerances (one place), the float64 parity check, ISA forcing, models."""
import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import gpt2kern
from gpt2kern import ops

EPS32 = torch.finfo(torch.float32).eps
ULPS = 4  # per-kernel error budget, in fp32 ulps of the terms, scaled by sqrt(reduction length)
LOGITS_ATOL = 1e-4  # end to end vs HF eager fp32


# Property tests (tests/test_properties.py): "ci" is small and derandomized so CI is fast and repeatable; "fuzz"
# (pytest --fuzz, or HYPOTHESIS_PROFILE=fuzz) tries thousands of random examples per op and keeps failures in
# .hypothesis/ to replay them first next time.
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW, print_blob=True)
settings.register_profile("fuzz", max_examples=2000, deadline=None, suppress_health_check=_SLOW, print_blob=True)


def pytest_addoption(parser):
    parser.addoption("--fuzz", action="store_true", help="run the property tests with the large 'fuzz' profile")


def pytest_configure(config):
    settings.load_profile("fuzz" if config.getoption("--fuzz") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def assert_parity(out, ref64, absterms=None, n=1, what=""):
    """|out - ref| <= ULPS·eps·(|ref| + sqrt(n)·absterms): a few fp32 ulps of the summed terms, scaled by the
    reduction length n. absterms is Σ|term| in float64 (|x|@|W| for a matmul); defaults to |ref|."""
    out, ref64 = out.cpu(), ref64.double().cpu()
    if absterms is None:
        absterms = ref64.abs()
    tol = ULPS * EPS32 * (ref64.abs() + math.sqrt(n) * absterms.double().cpu()) + 1e-30
    err = (out.double() - ref64).abs()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all() == torch.isfinite(ref64).all(), f"{what}: non-finite mismatch"
    ratio = (err / tol).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"{what}: max error {err.max().item():.3g} is {ratio:.2f}x the ulp budget"
    return err.max().item() if err.numel() else 0.0


@pytest.fixture(params=ops.supported_isas())
def isa(request):
    """Run the test under each ISA level this CPU supports (AVX-512, AVX2, portable)."""
    before = ops.isa()
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa(before)


HAS_CUDA = ops.has_cuda() and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA test: no GPU here (torch.cuda.is_available() is False)" if ops.has_cuda()
    else "CUDA test: gpt2kern._C was built without its CUDA kernels")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]  # for @pytest.mark.parametrize("dev", DEVICES)
# tests of what happens without a GPU: they skip where one is visible, with a reason gpu_check.sh allows (these are
# not CUDA tests that failed to run)
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a test of the no-GPU path: this machine has a GPU")


@pytest.fixture(params=[*ops.supported_isas(), pytest.param("cuda", marks=needs_cuda)])
def device(request):
    """The op parity tests' backends: each CPU ISA level this machine runs (yields "cpu" with that ISA forced),
    then the CUDA kernels (yields "cuda"; skipped without a GPU)."""
    if request.param == "cuda":
        yield "cuda"
        return
    before = ops.isa()
    ops.set_isa(request.param)
    yield "cpu"
    ops.set_isa(before)


def plant_outliers(x, channels=(3, 17), value=2500.0):
    """GPT-2's residual stream carries a few channels in the thousands; put some in test inputs."""
    x = x.clone()
    for c in channels:
        if c < x.shape[-1]:
            x[..., c] = value * (1 + torch.rand(x.shape[:-1]))
    return x


@pytest.fixture(scope="session")
def distil():
    m, _ = gpt2kern.load("random:distilgpt2")
    return m


@pytest.fixture(scope="session")
def tiny():
    m, _ = gpt2kern.load("random:tiny")
    return m


def pair(model, dev="cpu"):
    """(HF reference, optimized copy) of the same weights, on `dev` (HF's own forward on that device is the
    reference there)."""
    ref = model if dev == "cpu" else copy.deepcopy(model).to(dev)
    return ref, gpt2kern.optimize(copy.deepcopy(model).to(dev))


def pytest_collection_modifyitems(config, items):
    """Combinations that do not exist are not collected (rather than skipped, which gpu_check counts against a GPU
    run): CUDA reads HF's [in, out] ('kn') weights only, so no CUDA test of the [out, in] ('nk') layout."""
    gone = [it for it in items if getattr(it, "callspec", None) is not None
            and it.callspec.params.get("device") == "cuda" and it.callspec.params.get("layout") == "nk"]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [it for it in items if it not in gone]
