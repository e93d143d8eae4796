import pytest
import torch
from conftest import DEVICES, assert_parity, plant_outliers

from gpt2kern import ops


def ref_ln(x, w, b, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + eps)
    terms = ((x.abs() + mean.abs()) / torch.sqrt(var + eps)) * w.double().abs() + b.double().abs()
    return xhat * w.double() + b.double(), terms


SHAPES = [(1, 768), (3, 5, 768), (7, 33), (1024, 768), (2, 1, 1024), (4, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_float64(device, shape):
    torch.manual_seed(0)
    n = shape[-1]
    x = plant_outliers(torch.randn(shape) * 3)
    w, b = torch.randn(n), torch.randn(n)
    ref, terms = ref_ln(x, w, b, 1e-5)
    y = ops.layer_norm(x.to(device), w.to(device), b.to(device), 1e-5)
    assert_parity(y, ref, terms, n, f"layer_norm {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm_matches_float64(device, shape):
    torch.manual_seed(1)
    n = shape[-1]
    x, r = torch.randn(shape), plant_outliers(torch.randn(shape))
    w, b = torch.randn(n), torch.randn(n)
    s, y = ops.add_layer_norm(*(t.to(device) for t in (x, r, w, b)), 1e-5)
    assert torch.equal(s.cpu(), x + r)  # one fp32 add: exactly torch's
    ref, terms = ref_ln(x + r, w, b, 1e-5)
    assert_parity(y, ref, terms, n, f"add_layer_norm {shape}")


@pytest.mark.parametrize("dev", DEVICES)
def test_non_contiguous_inputs(dev):
    x = torch.randn(6, 768, 2, device=dev)[..., 0]  # stride 2 on the normalized dim
    r = torch.randn(768, 6, device=dev).t()
    w, b = torch.randn(768, device=dev), torch.randn(768, device=dev)
    assert_parity(ops.layer_norm(x, w, b, 1e-5), *ref_ln(x, w, b, 1e-5), 768)
    s, y = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(s, x + r)
    assert_parity(y, *ref_ln(x + r, w, b, 1e-5), 768)
    xs = torch.randn(4 * 768 + 1, device=dev)[1:].view(4, 768)  # rows off a 16-byte boundary: CUDA's scalar path
    assert_parity(ops.layer_norm(xs, w, b, 1e-5), *ref_ln(xs, w, b, 1e-5), 768)


def test_matches_torch_layer_norm():
    x = plant_outliers(torch.randn(64, 768))
    w, b = torch.randn(768), torch.randn(768)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5),
                               torch.nn.functional.layer_norm(x, (768,), w, b, 1e-5), atol=2e-5, rtol=1e-5)


def test_empty():
    assert ops.layer_norm(torch.empty(0, 8), torch.ones(8), torch.zeros(8)).shape == (0, 8)


@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(dev):
    x, r, w, b = (torch.randn(*s, device=dev) for s in ((3, 40), (3, 40), (40,), (40,)))
    torch.library.opcheck(torch.ops.gpt2kern.layer_norm, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.gpt2kern.add_layer_norm, (x, r, w, b, 1e-5))


def test_bad_input():
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(TypeError, match="x must be Float"):
        ops.layer_norm(torch.ones(2, 8, dtype=torch.float64), w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        ops.layer_norm(torch.ones(2, 8), torch.ones(7), b)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_layer_norm(torch.ones(2, 8), torch.ones(3, 8), w, b)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.layer_norm([1.0], w, b)
