import math

import pytest
import torch
from conftest import DEVICES, assert_parity

from gpt2kern import ops


def ref_gelu(x):
    """NewGELU in float64. 0.5·x·(1 + tanh(u)) written as x·sigmoid(2u): equal, but float64's 1 + tanh(u) itself
    cancels to 0 for x < −10, where the true value is still a (tiny) fp32 number."""
    x = x.double()
    return x * torch.sigmoid(2 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3)))


def gelu_terms(x):
    """|gelu(x)| times its condition number: in the negative tail gelu ~ x·e^(2u), so an ulp of u costs 2|u| ulps."""
    x = x.double()
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))
    return ref_gelu(x).abs() * (1 + 2 * u.abs())


@pytest.mark.parametrize("n", [1, 15, 16, 17, 4096 * 3 + 5])
def test_gelu_matches_float64(device, n):
    torch.manual_seed(n)
    x = torch.cat([torch.randn(n) * 4, torch.tensor([0.0, -0.0, 30.0, -30.0, 3000.0, -3000.0, 1e-30])])
    assert_parity(ops.gelu_new(x.to(device)), ref_gelu(x), gelu_terms(x), what="gelu_new")


def test_gelu_matches_hf_new_gelu():
    from transformers.activations import NewGELUActivation
    x = torch.randn(3, 7, 3072) * 3
    torch.testing.assert_close(ops.gelu_new(x), NewGELUActivation()(x), atol=1e-6, rtol=1e-5)


def test_gelu_is_not_erf_gelu():
    x = torch.linspace(-4, 4, 101)
    assert (ops.gelu_new(x) - torch.nn.functional.gelu(x)).abs().max() > 1e-4


@pytest.mark.parametrize("dev", DEVICES)
def test_gelu_special_values_follow_hf(dev):
    from transformers.activations import NewGELUActivation
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e30, -1e30], device=dev)
    torch.testing.assert_close(ops.gelu_new(x), NewGELUActivation()(x), equal_nan=True)


@pytest.mark.parametrize("dev", DEVICES)
def test_gelu_non_contiguous_and_opcheck(dev):
    x = torch.randn(8, 10, device=dev).t()
    assert_parity(ops.gelu_new(x), ref_gelu(x), gelu_terms(x))
    torch.library.opcheck(torch.ops.gpt2kern.gelu_new, (torch.randn(5, 33, device=dev),))


def test_bad_input():
    with pytest.raises(TypeError, match="must be Float"):
        ops.gelu_new(torch.ones(3, dtype=torch.int64))
