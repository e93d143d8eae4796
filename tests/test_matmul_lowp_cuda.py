"""The reduced-precision weight formats on CUDA: layout 'kn' ([in, out]) in fp16, bf16 or int8
(+ fp32 scales [in / group, out]), read by csrc/cuda/matmul_lowp.cu. The storage's properties run everywhere (the
quantizer is the panels' one, element for element); each CUDA kernel path against a float64 reference computed from
the *stored* weights, the epilogues, odd strides and alignment, int8 groups, bad input and opcheck skip without a
GPU. Whole models in these modes on CUDA: tests/test_cuda.py."""
import pytest
import torch
from conftest import assert_parity, needs_cuda, plant_outliers
from test_matmul import ref_mm
from test_matmul_lowp import LOWP, stored

from gpt2kern import ops
from gpt2kern.kernels.weights import INT8_GROUP, WeightFormat, int8_group

# ---------------------------------------------------------------- layout 'kn' in fp16 / bf16 / int8: the CUDA storage

def stored_kn(w, mode, group=None):
    fmt = WeightFormat("kn", mode, w.shape[0], w.shape[1], (group or INT8_GROUP) if mode == "int8" else 0)
    d, s = fmt.make(w)
    return fmt, d, s


@pytest.mark.parametrize("mode", LOWP)
def test_kn_storage_holds_the_panels_values(mode):
    """The CUDA storage ([in, out] in the dtype, int8 scales [in / group, out]) rounds and quantizes element for
    element as the CPU panels do: the two devices' modes hold the same weights."""
    torch.manual_seed(1)
    K, N = 192, 100
    w = torch.randn(K, N) * 0.05
    w[:, 7] = 0.0
    fk, d, s = stored_kn(w, mode)
    fp, dp, sp = stored(w, mode)
    assert d.shape == (K, N) and d.dtype == dp.dtype and d.is_contiguous()
    assert (s is None) == (mode != "int8")
    assert s is None or (s.shape == (K // INT8_GROUP, N) and s.dtype == torch.float32)
    assert torch.equal(fk.unpack(d, s), fp.unpack(dp, sp))
    assert fk.data_shape == (K, N) and fk.scales_shape == (None if mode != "int8" else (K // INT8_GROUP, N))
    assert fk.nbytes == K * N * d.element_size() + (K // INT8_GROUP * N * 4 if mode == "int8" else 0)
    # a view of a wider tensor (the lm_head's transpose) and the column chunks give the same storage
    wide = torch.randn(N + 5, K).t()[:, :N]
    assert torch.equal(stored_kn(wide, mode)[0].unpack(*stored_kn(wide, mode)[1:]),
                       stored(wide.contiguous(), mode)[0].unpack(*stored(wide.contiguous(), mode)[1:]))


def test_kn_storage_edge_cases():
    w = torch.randn(64, 8)
    w[3, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        stored_kn(w, "int8")
    with pytest.raises(ValueError, match="layout 'nk' reads an fp32 weight"):
        WeightFormat("nk", "bf16", 64, 8)
    with pytest.raises(ValueError, match="int8 group must divide"):
        WeightFormat("kn", "int8", 64, 8, 48)
    # the CPU kernels read 'kn' in fp32 only: the CUDA storage is refused there, by name
    _, d, s = stored_kn(torch.randn(64, 8), "int8")
    with pytest.raises(TypeError, match="must be float32"):
        ops.conv1d(torch.randn(2, 64), d, None, layout="kn", scales=s)


# ---------------------------------------------------------------- the CUDA kernels (csrc/cuda/matmul_lowp.cu)

# decode rows (GEMV: 1 and 8 rows per block, grid.z row chunks, split-K where N is narrow) and prefill rows (64x64
# tiles, 128x128 tiles when they fill the GPU); distilgpt2's projections, the lm_head, ragged and odd sizes (N odd:
# no 4-byte loads for fp16/bf16; K = 37: int8 group 37, one-row chunks)
CUDA_SHAPES = [(1, 768, 2304), (1, 3072, 768), (8, 768, 3072), (9, 768, 768), (32, 3072, 768), (2, 768, 50257),
               (5, 37, 100), (3, 128, 97), (1, 64, 1), (33, 768, 2304), (130, 3072, 768), (512, 768, 2304),
               (300, 64, 20000), (1030, 37, 4100)]


def _cuda_stored(w, mode, group=None):
    fmt = WeightFormat("kn", mode, w.shape[0], w.shape[1],
                       (group or int8_group(w.shape[0])) if mode == "int8" else 0)
    d, s = fmt.make(w.cuda())
    return fmt, d, s


@needs_cuda
@pytest.mark.parametrize("M,K,N", CUDA_SHAPES)
@pytest.mark.parametrize("mode", LOWP)
def test_lowp_cuda_matches_float64_of_stored_weights(M, K, N, mode):
    torch.manual_seed(M * 5 + N)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
    w, b = torch.randn(K, N) * 0.05, torch.randn(N)
    fmt, d, s = _cuda_stored(w, mode)
    y = ops.conv1d(x.cuda(), d, b.cuda(), out_features=N, layout="kn", scales=s)
    assert y.is_cuda and y.dtype == torch.float32
    assert_parity(y, *ref_mm(x, fmt.unpack(d, s).cpu(), b), K, f"cuda {mode} conv1d {M}x{K}x{N}")


@needs_cuda
@pytest.mark.parametrize("M,K,N", [s for s in CUDA_SHAPES if s[0] > 32] + [(128, 3072, 768), (1024, 768, 3072)])
@pytest.mark.parametrize("epilogue", ["none", "gelu_new", "residual"])
def test_lowp_cuda_bf16_prefill_on_tensor_cores(M, K, N, epilogue):
    # prefill GEMM variant 3 with bf16 weights (csrc/cuda/matmul_3xbf16.cu: x split into three bf16 parts, bf16 MMAs):
    # within the fp32 ulp budget of the stored weights' float64 product, another kernel than the SIMT tiles where it
    # runs (N % 8 == 0), bitwise the tiles where it does not (N = 4100)
    from test_gelu import gelu_terms, ref_gelu
    torch.manual_seed(M + K + N)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
    w, b, r = torch.randn(K, N) * 0.05, torch.randn(N), torch.randn(M, N)
    fmt, d, s = _cuda_stored(w, "bf16")
    pre, terms = ref_mm(x, fmt.unpack(d, s).cpu(), b)
    ref, terms = {"none": (pre, terms), "gelu_new": (ref_gelu(pre), 1.13 * terms + gelu_terms(pre)),
                  "residual": (pre + r.double(), terms + r.double().abs())}[epilogue]
    res = r.cuda() if epilogue == "residual" else None
    before = ops.cuda_variant("prefill_gemm")
    try:
        out = {}
        for v in (2, 3):
            ops.cuda_variant("prefill_gemm", v)
            out[v] = ops.conv1d(x.cuda(), d, b.cuda(), epilogue, res, out_features=N, scales=s)
    finally:
        ops.cuda_variant("prefill_gemm", before)
    assert_parity(out[3], ref, terms, K, f"cuda bf16 tensor cores {M}x{K}x{N} {epilogue}")
    assert torch.equal(out[3], out[2]) == (N % 8 != 0)


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
@pytest.mark.parametrize("M", [1, 4, 32, 40, 600])
def test_lowp_cuda_epilogues(mode, M):
    from test_gelu import gelu_terms, ref_gelu
    torch.manual_seed(6)
    K, N = 768, 300
    x, w, b, r = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N), plant_outliers(torch.randn(M, N))
    fmt, d, s = _cuda_stored(w, mode)
    pre, terms = ref_mm(x, fmt.unpack(d, s).cpu(), b)
    y = ops.conv1d(x.cuda(), d, b.cuda(), "gelu_new", out_features=N, scales=s)
    assert_parity(y, ref_gelu(pre), 1.13 * terms + gelu_terms(pre), K, f"cuda {mode}+gelu_new")
    y = ops.conv1d(x.cuda(), d, b.cuda(), "residual", r.cuda(), out_features=N, scales=s)
    assert_parity(y, pre + r.double(), terms + r.double().abs(), K, f"cuda {mode}+residual")
    y = ops.conv1d(x.cuda(), d, None, scales=s)  # no bias
    assert_parity(y, *ref_mm(x, fmt.unpack(d, s).cpu(), None), K, f"cuda {mode} no bias")


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
@pytest.mark.parametrize("M", [1, 8, 100])
def test_lowp_cuda_strided_and_unaligned_weights(mode, M):
    """Rows farther apart than N (a column slice) and a weight 2 bytes off 4-byte alignment: the element loads."""
    torch.manual_seed(7)
    K, N = 256, 130
    x = torch.randn(M, K)
    fmt, d, s = _cuda_stored(torch.randn(K, N + 3) * 0.05, mode)
    for lo, hi in ((0, N), (1, N + 1), (3, N + 3)):
        dv, sv = d[:, lo:hi], None if s is None else s[:, lo:hi]
        y = ops.conv1d(x.cuda(), dv, None, scales=sv)
        ref = fmt.unpack(d, s).cpu()[:, lo:hi]
        assert_parity(y, *ref_mm(x, ref, None), K, f"cuda {mode} columns {lo}:{hi}")


@needs_cuda
@pytest.mark.parametrize("group", [256, 64, 32, 16, 8, 3])
def test_lowp_cuda_int8_groups(group):
    torch.manual_seed(8)
    K, N = 768 if group != 3 else 771, 200
    for M in (1, 8, 200):
        x, w = torch.randn(M, K), torch.randn(K, N) * 0.05
        fmt, q, s = _cuda_stored(w, "int8", group)
        y = ops.conv1d(x.cuda(), q, None, scales=s)
        assert_parity(y, *ref_mm(x, fmt.unpack(q, s).cpu(), None), K, f"cuda int8 group {group} M={M}")


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
def test_lowp_cuda_quantizes_as_the_cpu(mode):
    torch.manual_seed(9)
    w = torch.randn(768, 300) * 0.05
    w[5, 5] = 30.0
    fc, dc, sc = _cuda_stored(w, mode)
    fk, d, s = stored_kn(w, mode, int8_group(768))
    assert torch.equal(fc.unpack(dc, sc).cpu(), fk.unpack(d, s))


@needs_cuda
def test_lowp_cuda_bad_input():
    x = torch.randn(2, 64, device="cuda")
    _, q, s = _cuda_stored(torch.randn(64, 40), "int8", 16)
    _, h, _ = _cuda_stored(torch.randn(64, 40), "fp16")
    with pytest.raises(ValueError, match="weight is int8 and needs its scales"):
        ops.conv1d(x, q)
    with pytest.raises(ValueError, match="only int8 weights take them"):
        ops.conv1d(x, h, scales=s)
    with pytest.raises(ValueError, match="only int8 weights take them"):
        ops.conv1d(x, torch.randn(64, 40, device="cuda"), scales=s)
    with pytest.raises(ValueError, match=r"scales must be \[64 / group, 40\]"):
        ops.conv1d(x, q, scales=s[:, :20])
    with pytest.raises(ValueError, match=r"scales must be \[64 / group, 40\]"):  # groups that do not divide K
        ops.conv1d(x, q, scales=torch.ones(3, 40, device="cuda"))
    with pytest.raises(ValueError, match=r"scales must be \[64 / group, 40\]"):
        ops.conv1d(x, q, scales=s[None])
    with pytest.raises(TypeError, match="scales must be Float"):
        ops.conv1d(x, q, scales=s.double())
    with pytest.raises(ValueError, match="scales is on cpu"):
        ops.conv1d(x, q, scales=s.cpu())
    with pytest.raises(ValueError, match="weight is on cpu"):
        ops.conv1d(x, h.cpu())
    with pytest.raises(ValueError, match="layout must be 'kn'"):
        ops.conv1d(x, h, out_features=40, layout="panels")
    with pytest.raises(ValueError, match=r"weight must be \[64, out\]"):
        ops.conv1d(x, h[:32])
    with pytest.raises(TypeError, match="x must be Float"):
        ops.conv1d(x.half(), h)
    with pytest.raises(TypeError, match="weight must be Float"):  # neither fp32 nor a reduced mode
        ops.conv1d(x, h.double())
    with pytest.raises(ValueError, match="out_features=41"):
        ops.conv1d(x, h, out_features=41)
    # empty reduction and empty rows
    _, q0, s0 = _cuda_stored(torch.randn(0, 5), "fp16")
    y = ops.conv1d(torch.randn(3, 0, device="cuda"), q0, torch.ones(5, device="cuda"))
    assert torch.equal(y.cpu(), torch.ones(3, 5))
    assert ops.conv1d(torch.randn(0, 64, device="cuda"), h).shape == (0, 40)


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
def test_lowp_cuda_opcheck(mode):
    x, w, b = torch.randn(3, 64, device="cuda"), torch.randn(64, 40), torch.randn(40, device="cuda")
    _, d, s = _cuda_stored(w, mode, 16)
    torch.library.opcheck(torch.ops.gpt2kern.conv1d, (x, d, b, "none", None, 40, "kn", s))
    x3 = x[:, None].expand(3, 40, 64)
    torch.library.opcheck(torch.ops.gpt2kern.conv1d, (x3, d, b, "gelu_new", None, -1, "kn", s))
