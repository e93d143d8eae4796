import math

import pytest
import torch
from conftest import DEVICES, assert_parity, plant_outliers
from test_gelu import gelu_terms, ref_gelu

from gpt2kern import _C, ops

# (M, K, N): decode and prefill rows at distilgpt2's projections, odd sizes, and the lm_head's 50257 columns
SHAPES = [(1, 768, 2304), (5, 768, 768), (13, 768, 3072), (128, 3072, 768), (1, 33, 50), (7, 1, 31),
          (3, 768, 50257), (29, 100, 97), (1024, 768, 768)]


LAYOUTS = ["kn", "panels", "nk"]


def weight_as(w, layout, device):
    """w [K, N] stored as conv1d reads it in `layout`: (tensor, layout name). CUDA keeps HF's [in, out] ('kn')."""
    if layout == "nk":  # (CPU only: conftest collects no CUDA test of this layout)
        assert device == "cpu", "CUDA reads [in, out] ('kn') weights only"
        return w.t().contiguous(), "nk"
    if layout == "panels":
        p = ops.pack(w.to(device))
        return p, ("panels" if p.dim() == 3 else "kn")
    return w.to(device), "kn"


def ref_mm(x, w, b):
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    y = x64 @ w64 + (b.double() if b is not None else 0)
    terms = x64.abs() @ w64.abs() + (b.double().abs() if b is not None else 0)
    return y.reshape(*x.shape[:-1], -1), terms.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv1d_matches_float64(device, M, K, N, layout):
    torch.manual_seed(M * 7 + N)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)  # trained GPT-2's residual outliers
    w, b = torch.randn(K, N) * 0.05, torch.randn(N)
    weight, layout = weight_as(w, layout, device)
    y = ops.conv1d(x.to(device), weight, b.to(device), out_features=N, layout=layout)
    assert_parity(y, *ref_mm(x, w, b), K, f"conv1d {M}x{K}x{N}")


@pytest.mark.parametrize("M,K,N", [(1, 768, 3072), (9, 64, 100), (130, 768, 3072), (29, 2500, 70)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gelu_epilogue(device, M, K, N, layout):
    torch.manual_seed(2)
    x, w, b = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N)
    wd, layout = weight_as(w, layout, device)
    y = ops.conv1d(x.to(device), wd, b.to(device), "gelu_new", out_features=N, layout=layout)
    pre, terms = ref_mm(x, w, b)
    # error of the pre-activation (its ulp budget), carried through gelu's slope (|gelu'| < 1.13), plus gelu's own
    ref = ref_gelu(pre)
    assert_parity(y, ref, 1.13 * terms + gelu_terms(pre), K, "conv1d+gelu_new")


@pytest.mark.parametrize("M,K,N", [(1, 768, 768), (17, 3072, 768), (3, 5, 40)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_residual_epilogue(device, M, K, N, layout):
    torch.manual_seed(3)
    x, w, b = torch.randn(2, M, K), torch.randn(K, N) * 0.05, torch.randn(N)
    res = plant_outliers(torch.randn(2, M, N))
    wd, layout = weight_as(w, layout, device)
    y = ops.conv1d(x.to(device), wd, b.to(device), "residual", residual=res.to(device), out_features=N,
                   layout=layout)
    ref, terms = ref_mm(x, w, b)
    assert_parity(y, ref + res.double(), terms + res.double().abs(), K, "conv1d+residual")


@pytest.mark.parametrize("dev", DEVICES)
def test_strided_and_batched_inputs(dev):
    x = torch.randn(2, 7, 64, 3, device=dev)[..., 1]  # non-contiguous rows
    w, b = torch.randn(64, 48, device=dev), torch.randn(48, device=dev)
    assert_parity(ops.conv1d(x, w.t().contiguous().t(), b), *ref_mm(x, w, b), 64)
    xs = torch.randn(4, 10, 64, device=dev)[:, -1:]  # the lm_head sees a last-position slice
    assert_parity(ops.conv1d(xs, w, None), *ref_mm(xs, w, None), 64)
    wt = torch.randn(48, 64, device=dev).t()  # the tied lm_head weight, transposed: a column-major [K, N]
    assert_parity(ops.conv1d(xs, wt, None), *ref_mm(xs, wt, None), 64)
    if dev == "cpu":  # ... and the same [N, K] storage read in place as 'nk'; a column-strided one is copied
        assert_parity(ops.conv1d(xs, wt.t(), None, layout="nk"), *ref_mm(xs, wt, None), 64)
        wc = torch.randn(64, 48).t()  # [N=48, K=64] with column stride 48
        assert_parity(ops.conv1d(xs, wc, None, layout="nk"), *ref_mm(xs, wc.t(), None), 64)


def test_pack_layout():
    w = torch.randn(5, 40)
    p = ops.pack(w)
    assert p.shape == (2, 5, 32)
    assert torch.equal(p[0], w[:, :32]) and torch.equal(p[1, :, :8], w[:, 32:])
    assert (p[1, :, 8:] == 0).all()


def test_matches_hf_conv1d():
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(96, 32)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(ops.conv1d(x, conv.weight, conv.bias), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(dev):
    x, w, b, r = (torch.randn(*s, device=dev) for s in ((3, 16), (16, 40), (40,), (3, 40)))
    torch.library.opcheck(torch.ops.gpt2kern.pack, (w,))
    p = ops.pack(w)
    lay = "panels" if p.dim() == 3 else "kn"
    cases = [(x, w, b, "none", None, -1), (x, p, b, "gelu_new", None, 40, lay), (x, p, None, "residual", r, 40, lay)]
    if dev == "cpu":
        cases.append((x, w.t().contiguous(), b, "none", None, -1, "nk"))
    for args in cases:
        torch.library.opcheck(torch.ops.gpt2kern.conv1d, args)


def test_bad_input():
    x, w = torch.randn(2, 8), torch.randn(8, 40)
    with pytest.raises(ValueError, match=r"weight in layout 'kn' must be \[8, 40\]"):
        ops.conv1d(x, torch.randn(9, 40))
    with pytest.raises(ValueError, match="epilogue must be one of"):
        ops.conv1d(x, w, epilogue="relu")
    with pytest.raises(ValueError, match="needs a residual"):
        ops.conv1d(x, w, epilogue="residual")
    with pytest.raises(ValueError, match="panels"):
        ops.conv1d(x, ops.pack(w), out_features=100, layout="panels")
    with pytest.raises(ValueError, match="layout 'kn' must be"):  # a packed weight is not taken for HF's layout
        ops.conv1d(x, ops.pack(w), out_features=40)
    with pytest.raises(ValueError, match="layout must be one of"):
        ops.conv1d(x, w, layout="auto")
    for dev in ("cpu", "meta"):  # the fake implementation refuses the same way
        with pytest.raises(ValueError, match="needs out_features"):
            ops.conv1d(x.to(dev), ops.pack(w).to(dev), layout="panels")
    with pytest.raises(TypeError, match="must be Float"):
        ops.conv1d(x.half(), w)
    with pytest.raises(ValueError, match="bias must be"):
        ops.conv1d(x, w, torch.randn(41))
    assert ops.conv1d(torch.randn(0, 8), w).shape == (0, 40)
    assert math.isfinite(ops.conv1d(torch.randn(1, 8), w).sum().item())


@pytest.mark.parametrize("M", [3, 6, 9, 13, 16])
def test_hf_layout_decode_rows_equal_one_row_bit_for_bit(isa, M):
    """Decode over HF's [in, out] weight: every row of a batch gets the bits it gets alone, whichever GEMV serves the
    batch (one row; the shared-vector GEMV; the register tiles from 6 rows, in passes of W's rows, tiles of unequal
    height) — K with a tail past the eight-row groups and the 128-row blocks, columns past the last vector, a
    sliced weight. Speculative decoding's verify relies on it."""
    if _C.matmul_strategy("kn", "fp32", M, 0) != "kn_decode_gemv":
        pytest.skip(f"{M} rows are prefill under the {isa} table (past its GEMV's limit)")
    torch.manual_seed(M)
    K, N = 300, 100
    x = plant_outliers(torch.randn(M, K))
    w = torch.randn(K, N + 5) * 0.05
    for wi in (w[:, :N].contiguous(), w[:, :N]):
        y = ops.conv1d(x, wi, None, out_features=N)
        one = torch.cat([ops.conv1d(x[i:i + 1], wi, None, out_features=N) for i in range(M)])
        assert torch.equal(y, one), (isa, M, wi.is_contiguous())


@pytest.mark.parametrize("M,K,N", [(17, 200, 97), (130, 256, 768), (1024, 192, 768), (29, 100, 97)])
def test_hf_layout_in_place_equals_packed_bit_for_bit(isa, M, K, N):
    """HF's [in, out] weight read in place (no packed copy) adds the same terms in the same order as the packed panels
    in prefill (more rows than the decode GEMV's limit, 16 at most): identical results, every epilogue, with a
    non-contiguous (sliced) weight too. (Decode in place sums fixed blocks of 128 rows of W and adds the blocks; and
    where prefill splits K differently — blocks of 768 in place, 1024 packed — the tail rows' two-accumulator tiles
    round differently: test_conv1d_matches_float64 bounds both layouts there, and test_threads checks neither
    depends on the thread count.)"""
    torch.manual_seed(M + K)
    x = plant_outliers(torch.randn(M, K))
    w, b, r = torch.randn(K, N + 3) * 0.05, torch.randn(N), torch.randn(M, N)
    for wi in (w[:, :N].contiguous(), w[:, :N]):  # a contiguous weight, and rows N + 3 apart
        for epi, res in (("none", None), ("gelu_new", None), ("residual", r)):
            a = ops.conv1d(x, wi, b, epi, res, N)
            p = ops.conv1d(x, ops.pack(wi), b, epi, res, N, layout="panels")
            assert torch.equal(a, p), (epi, wi.is_contiguous())
