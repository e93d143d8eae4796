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
    with pytest.raises(ValueError, match="int8 group must divide"):
        WeightFormat("nk", "int8", 64, 8, 48)
    with pytest.raises(ValueError, match="int8 group must divide"):
        WeightFormat("kn", "int8", 64, 8, 48)
    # the CPU kernels read 'kn' in fp32 only: the CUDA storage is refused there, by name
    _, d, s = stored_kn(torch.randn(64, 8), "int8")
    with pytest.raises(TypeError, match="must be float32"):
        ops.conv1d(torch.randn(2, 64), d, None, layout="kn", scales=s)


# ---------------------------------------------------------------- layout 'nk' in fp16 / bf16 / int8: gemv=2's copies

@pytest.mark.parametrize("mode", LOWP)
@pytest.mark.parametrize("K,N,group", [(192, 100, None), (97, 13, 1), (768, 40, 48), (64, 1, None)])
def test_nk_copy_holds_the_kn_values(mode, K, N, group):
    """nk_copy (what CudaGraphDecoder gemv=2 and matmul_nk read) holds the 'kn' storage's values transposed: the same
    q and scales, no second rounding; make() in layout 'nk' gives the same; int8 scales are [out, in / group]."""
    torch.manual_seed(K + N)
    w = torch.randn(K, N) * 0.05
    w[:, 0] = 0.0
    fk, d, s = stored_kn(w, mode, group or int8_group(K))
    fn, dn, sn = fk.nk_copy(d, s)
    assert fn == WeightFormat("nk", mode, K, N, fk.group)
    assert dn.shape == (N, K) == fn.data_shape and dn.dtype == d.dtype and dn.is_contiguous()
    assert (sn is None) == (mode != "int8")
    assert sn is None or (sn.shape == (N, K // fk.group) == fn.scales_shape and sn.is_contiguous()
                          and sn.dtype == torch.float32)
    assert torch.equal(fn.unpack(dn, sn), fk.unpack(d, s))
    assert fn.nbytes == fk.nbytes
    dm, sm = fn.make(w)
    assert torch.equal(dm, dn) and (sm is None or torch.equal(sm, sn))
    # from 'nk' (a row-strided view included): as it is, contiguous
    wide_s = None if sn is None else torch.cat([sn, sn], 1)[:, :sn.shape[1]]
    f2, d2, s2 = fn.nk_copy(torch.cat([dn, dn], 1)[:, :K], wide_s)
    assert f2 == fn and d2.is_contiguous() and torch.equal(f2.unpack(d2, s2), fn.unpack(dn, sn))


def test_nk_copy_refuses_panels_and_cpu_conv1d_refuses_it():
    fp, dp, sp = stored(torch.randn(64, 40), "int8")
    with pytest.raises(ValueError, match="nk_copy reads layout 'kn' or 'nk'"):
        fp.nk_copy(dp, sp)
    fk, dk, sk = stored_kn(torch.randn(64, 40), "int8", 16)
    fn, dn, sn = fk.nk_copy(dk, sk)
    with pytest.raises(TypeError, match="must be float32"):  # the CPU kernels read 'nk' in fp32 only
        ops.conv1d(torch.randn(2, 64), dn, None, out_features=40, layout="nk", scales=sn)


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
def test_lowp_cuda_bf16_tensor_cores_edges():
    # a partial last K tile (K = 100), a column slice of W (row stride > N, 16 bytes in), x rows 4 floats apart more
    # than K: each through the tensor-core GEMM, within the budget of the stored weights' float64 product
    torch.manual_seed(9)
    M, K, N = 100, 100, 264
    fmt, d, s = _cuda_stored(torch.randn(K, N + 16) * 0.05, "bf16")
    xw = torch.randn(M, K + 4)
    x = xw.cuda()[:, :K]
    dv = d[:, 8:8 + N]
    ref = fmt.unpack(d, s).cpu()[:, 8:8 + N]
    before = ops.cuda_variant("prefill_gemm")
    try:
        out = {}
        for v in (2, 3):
            ops.cuda_variant("prefill_gemm", v)
            out[v] = ops.conv1d(x, dv, None)
    finally:
        ops.cuda_variant("prefill_gemm", before)
    assert_parity(out[3], *ref_mm(xw[:, :K], ref, None), K, "cuda bf16 tensor cores: partial K tile, strided W and x")
    assert not torch.equal(out[3], out[2])  # the tensor cores ran


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


# ---------------------------------------------------------------- decode GEMV variant 2 over reduced weights
# (ops.matmul_nk on the 'nk' copies: a warp per column, 16-byte loads; CudaGraphDecoder gemv=2)

def _nk_stored(w_in_out, mode, group=None):
    """(format 'nk', data [N, K], scales [N, K / group]) of w [K, N] in `mode`, on the GPU."""
    fmt, d, s = _cuda_stored(w_in_out, mode, group)
    return fmt.nk_copy(d, s)


def _nk_ref(x, fmt, d, s, b):
    return ref_mm(x, fmt.unpack(d, s).cpu(), b)


# decode rows 1, 5 (8 register rows) and 32; gpt2 / gpt2-xl inputs 768, 1600, 3072, 6400 and odd ones (97, 6403:
# element loads; int8 groups 1 and 19); outputs 768, 2304, the vocabulary and odd ones. Narrow outputs with long rows
# (N <= 1600 with K >= 1600 on an H100 / H200) share a column between 2 or 4 warps (lowp_nk_split)
NK_SHAPES = [(1, 768, 2304), (1, 1600, 768), (1, 3072, 768), (1, 6400, 1600), (1, 768, 50257), (1, 1600, 50257),
             (5, 1600, 2304), (5, 6400, 129), (5, 97, 2304), (32, 768, 50257), (32, 3072, 777), (32, 1600, 4800),
             (1, 97, 101), (32, 97, 768), (5, 768, 1), (5, 6403, 200), (32, 6400, 33)]


@needs_cuda
@pytest.mark.parametrize("M,K,N", NK_SHAPES)
@pytest.mark.parametrize("mode", LOWP)
def test_lowp_nk_cuda_matches_float64_of_stored_weights(M, K, N, mode):
    torch.manual_seed(M * 11 + K + N)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
    w, b = torch.randn(K, N) * 0.05, torch.randn(N)
    fmt, d, s = _nk_stored(w, mode)
    y = ops.matmul_nk(x.cuda(), d, b.cuda(), scales=s)
    assert y.is_cuda and y.dtype == torch.float32 and y.shape == (M, N)
    assert_parity(y, *_nk_ref(x, fmt, d, s, b), K, f"cuda {mode} matmul_nk {M}x{K}x{N}")


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
@pytest.mark.parametrize("M", [1, 5, 32])
@pytest.mark.parametrize("epilogue", ["none", "gelu_new", "residual"])
def test_lowp_nk_cuda_epilogues(mode, M, epilogue):
    from test_cuda import epilogue_ref
    torch.manual_seed(12 + M)
    K, N = 1600, 300
    x, w, b = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N)
    res = plant_outliers(torch.randn(M, N)) if epilogue == "residual" else None
    fmt, d, s = _nk_stored(w, mode)
    y = ops.matmul_nk(x.cuda(), d, b.cuda(), epilogue, None if res is None else res.cuda(), s)
    ref, terms = epilogue_ref(*_nk_ref(x, fmt, d, s, b), epilogue, res)
    assert_parity(y, ref, terms, K, f"cuda {mode} matmul_nk {epilogue} M={M}")
    if epilogue == "none":  # no bias; a 3-D x of decode shape [B, 1, K]
        y = ops.matmul_nk(x[:, None].cuda(), d, None, scales=s)
        assert y.shape == (M, 1, N)
        assert_parity(y[:, 0], *_nk_ref(x, fmt, d, s, None), K, f"cuda {mode} matmul_nk no bias M={M}")


@needs_cuda
@pytest.mark.parametrize("group", [64, 48, 32, 16, 8, 3, 1])
@pytest.mark.parametrize("M", [1, 5, 32])
def test_lowp_nk_cuda_int8_groups(group, M):
    """Groups that are multiples of 16 (one scale per 16-byte load; 64 and 32: a shift, 48: a division) and the
    others (element loads, a scale per element)."""
    torch.manual_seed(13 + group)
    K, N = 768 if group != 3 else 771, 200
    x, w = torch.randn(M, K), torch.randn(K, N) * 0.05
    fmt, q, s = _nk_stored(w, "int8", group)
    assert s.shape == (N, K // group)
    y = ops.matmul_nk(x.cuda(), q, None, scales=s)
    assert_parity(y, *_nk_ref(x, fmt, q, s, None), K, f"cuda int8 matmul_nk group {group} M={M}")


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
@pytest.mark.parametrize("M", [1, 5, 32])
def test_lowp_nk_cuda_strided_and_unaligned(mode, M):
    """The element path where the 16-byte loads cannot run, and the vector path with padded rows and a K % 8 tail:
    x rows not 16-byte aligned, x with a non-unit last stride (copied), weight rows farther apart than K (aligned:
    vector loads, K = 780 leaves 4 elements for fp16 / bf16), weight rows 1 element off 16-byte alignment,
    scales rows farther apart than K / group and scales with a non-unit column stride."""
    torch.manual_seed(14 + M)
    K, N = 784, 130
    G = 16 if mode == "int8" else 0
    xw = torch.randn(M, K + 19)
    xc = xw.cuda()
    fmt, d, s = _nk_stored(torch.randn(K + 16, N) * 0.05, mode, 16)  # [N, K + 16]: rows padded
    full = fmt.unpack(d, s).cpu()  # [K + 16, N]
    for k_lo, k_hi in ((0, K), (0, 780), (1, K + 1), (16, K + 16)):
        kk = k_hi - k_lo
        if mode == "int8" and (k_lo % G or kk % G):  # a slice of int8 rows must keep whole groups
            continue
        dv = d[:, k_lo:k_hi]
        sv = None if s is None else s[:, k_lo // 16:k_hi // 16]
        ref_w = full[k_lo:k_hi]
        # x: rows K + 19 floats apart (not 16-byte aligned but the first), 1 float off alignment, contiguous, and
        # a transposed view (last stride M: the glue copies it)
        for xv in (xc[:, :kk], xc[:, 1:kk + 1], xc[:, :kk].contiguous(), xc[:, :kk].t().contiguous().t()):
            y = ops.matmul_nk(xv, dv, None, scales=sv)
            assert_parity(y, *ref_mm(xv.cpu(), ref_w, None), kk, f"cuda {mode} matmul_nk k {k_lo}:{k_hi}")
    if s is not None:  # scales [N, K / group] with a column stride of 2: made contiguous by the glue
        st = torch.stack([s, s], 2).view(N, -1)[:, ::2]
        assert st.stride(1) == 2
        y = ops.matmul_nk(xc[:, :K + 16], d, None, scales=st)
        assert_parity(y, *ref_mm(xw[:, :K + 16], full, None), K + 16, "cuda int8 matmul_nk strided scales")


@needs_cuda
def test_lowp_nk_cuda_bad_input():
    x = torch.randn(2, 64, device="cuda")
    _, q, s = _nk_stored(torch.randn(64, 40), "int8", 16)
    _, h, _ = _nk_stored(torch.randn(64, 40), "fp16")
    with pytest.raises(ValueError, match="weight is int8 and needs its scales"):
        ops.matmul_nk(x, q)
    with pytest.raises(ValueError, match="only int8 weights take them"):
        ops.matmul_nk(x, h, scales=s)
    with pytest.raises(ValueError, match="only int8 weights take them"):
        ops.matmul_nk(x, torch.randn(40, 64, device="cuda"), scales=s)
    with pytest.raises(ValueError, match=r"scales must be \[40, 64 / group\]"):
        ops.matmul_nk(x, q, scales=s[:20])
    with pytest.raises(ValueError, match=r"scales must be \[40, 64 / group\]"):  # groups that do not divide K
        ops.matmul_nk(x, q, scales=torch.ones(40, 3, device="cuda"))
    with pytest.raises(ValueError, match=r"scales must be \[40, 64 / group\]"):
        ops.matmul_nk(x, q, scales=s.t())  # the 'kn' orientation
    with pytest.raises(TypeError, match="scales must be Float"):
        ops.matmul_nk(x, q, scales=s.double())
    with pytest.raises(ValueError, match="scales is on cpu"):
        ops.matmul_nk(x, q, scales=s.cpu())
    with pytest.raises(ValueError, match="weight is on cpu"):
        ops.matmul_nk(x, h.cpu())
    with pytest.raises(ValueError, match=r"weight must be \[N, 64\]"):
        ops.matmul_nk(x, h.t().contiguous())  # the [in, out] storage
    with pytest.raises(TypeError, match="weight must be Float .*got Double"):
        ops.matmul_nk(x, h.double())
    with pytest.raises(TypeError, match="x must be Float"):
        ops.matmul_nk(x.half(), h)
    with pytest.raises(ValueError, match="at most 32 rows"):
        ops.matmul_nk(torch.randn(33, 64, device="cuda"), h)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.matmul_nk(x.cpu(), h.cpu())
    assert ops.matmul_nk(torch.randn(0, 64, device="cuda"), q, None, scales=s).shape == (0, 40)


@needs_cuda
@pytest.mark.parametrize("mode", LOWP)
def test_lowp_nk_cuda_opcheck(mode):
    x, w, b = torch.randn(3, 64, device="cuda"), torch.randn(64, 40), torch.randn(40, device="cuda")
    _, d, s = _nk_stored(w, mode, 16)
    torch.library.opcheck(torch.ops.gpt2kern.matmul_nk, (x, d, b, "none", None, s))
    torch.library.opcheck(torch.ops.gpt2kern.matmul_nk, (x[:, None], d, None, "gelu_new", None, s))
    r = torch.randn(3, 40, device="cuda")
    torch.library.opcheck(torch.ops.gpt2kern.matmul_nk, (x, d, b, "residual", r, s))


def test_lowp_nk_fake_gives_the_shape():
    m = dict(device="meta")
    y = torch.ops.gpt2kern.matmul_nk(torch.empty(3, 1, 64, **m), torch.empty(40, 64, dtype=torch.int8, **m), None,
                                     "none", None, torch.empty(40, 4, **m))
    assert y.shape == (3, 1, 40) and y.dtype == torch.float32 and y.device.type == "meta"
