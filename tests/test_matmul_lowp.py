"""The reduced-precision weight formats (fp16, bf16, int8 in packed panels): each kernel against a float64
reference computed from the *stored* weights (so the kernel itself is held to fp32 ulps, every ISA, decode and
prefill paths), and the formats' own properties (rounding, quantizer edge cases, bad input). The formats' error
against fp32 weights is measured end to end, not here (gpt2kern parity --weights, the bench)."""
import pytest
import torch
from conftest import assert_parity, plant_outliers
from test_matmul import ref_mm

from gpt2kern import ops
from gpt2kern.kernels.weights import INT8_GROUP, WeightFormat

LOWP = ["fp16", "bf16", "int8"]


@pytest.fixture(autouse=True)
def _int8_widened():
    """These tests hold the kernels that widen the stored weights to fp32 (decode's default, and prefill's without
    AVX512-VNNI); the int8 dot-product kernels (x quantized too) have their own, tests/test_matmul_int8dot.py."""
    with ops.using_int8_dot(False):
        yield
# decode rows (the in-register widening path: M <= 16) and prefill rows (widened into an fp32 buffer per K block),
# distilgpt2's projections, the lm_head's 50257 columns, odd sizes
SHAPES = [(1, 768, 2304), (2, 3072, 768), (8, 768, 3072), (16, 64, 100), (17, 768, 768), (130, 3072, 768),
          (3, 768, 50257), (29, 128, 97), (1, 64, 1)]


def x_as_read(x, mode):
    """x as the kernel multiplies it: bf16 and int8 (even group) weights in prefill (M > 16 rows) on a CPU with
    AVX512_BF16 round x to bf16 too (VDPBF16PS; test_bf16_dot_* below), every other case keeps x in fp32."""
    from gpt2kern import _C

    return x.bfloat16().float() if mode in ("bf16", "int8") and x.shape[0] > 16 and _C.bf16_dot() else x


def stored(w, mode, group=None):
    fmt = WeightFormat("panels", mode, w.shape[0], w.shape[1], (group or INT8_GROUP) if mode == "int8" else 0)
    d, s = fmt.make(w)
    return fmt, d, s


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("mode", LOWP)
def test_lowp_matches_float64_of_stored_weights(isa, M, K, N, mode):
    torch.manual_seed(M * 3 + N)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
    w, b = torch.randn(K, N) * 0.05, torch.randn(N)
    fmt, d, s = stored(w, mode)
    y = ops.conv1d(x, d, b, out_features=N, layout="panels", scales=s)
    assert_parity(y, *ref_mm(x_as_read(x, mode), fmt.unpack(d, s), b), K, f"{mode} conv1d {M}x{K}x{N}")


@pytest.mark.parametrize("mode", LOWP)
@pytest.mark.parametrize("M", [1, 4, 40])
def test_lowp_epilogues(isa, mode, M):
    torch.manual_seed(5)
    K, N = 192, 100
    x, w, b, r = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N), plant_outliers(torch.randn(M, N))
    fmt, d, s = stored(w, mode)
    pre, terms = ref_mm(x_as_read(x, mode), fmt.unpack(d, s), b)
    from test_gelu import gelu_terms, ref_gelu
    y = ops.conv1d(x, d, b, "gelu_new", out_features=N, layout="panels", scales=s)
    assert_parity(y, ref_gelu(pre), 1.13 * terms + gelu_terms(pre), K, f"{mode}+gelu_new")
    y = ops.conv1d(x, d, b, "residual", r, out_features=N, layout="panels", scales=s)
    assert_parity(y, pre + r.double(), terms + r.double().abs(), K, f"{mode}+residual")


def test_rounding_of_the_stored_formats():
    w = torch.randn(64, 40) * 0.05
    for mode, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        fmt, d, _ = stored(w, mode)
        # torch's round-to-nearest-even cast, element for element, in the panel layout
        assert torch.equal(fmt.unpack(d, None), w.to(dt).double())
    fmt, q, s = stored(w, "int8", group=16)
    deq = fmt.unpack(q, s)
    # each group's largest |w| is stored exactly as ±127 · scale, every other weight within half a step
    step = s.double().transpose(0, 1).reshape(64 // 16, -1)[:, :40].repeat_interleave(16, dim=0)
    assert ((deq - w.double()).abs() <= 0.5 * step * (1 + 1e-6)).all()
    assert q.abs().max().item() == 127


def test_int8_quantizer_edge_cases():
    K, N = 128, 40
    w = torch.randn(K, N) * 0.05
    w[:, 3] = 0.0  # an all-zero column: scale 1, codes 0, exact zeros out
    w[:, 5] = 0.25  # a constant column: stored exactly
    w[7, 9] = 40.0  # one outlier weight: it costs only its own group's precision, not the column's
    fmt, q, s = stored(w, "int8", group=64)
    deq = fmt.unpack(q, s)
    assert (deq[:, 3] == 0).all() and torch.allclose(deq[:, 5], torch.full((K,), 0.25, dtype=torch.float64))
    assert (deq[64:, 9] - w[64:, 9].double()).abs().max() < 0.5 * w[64:, 9].abs().max() / 127 * 1.01
    x = torch.randn(3, K)
    y = ops.conv1d(x, q, None, out_features=N, layout="panels", scales=s)
    assert (y[:, 3] == 0).all()
    for bad in (float("nan"), float("inf")):
        wb = w.clone()
        wb[1, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            stored(wb, "int8")
        with pytest.raises(ValueError, match="NaN or inf"):
            stored(wb, "fp16")


def test_group_sizes_per_channel_to_32():
    """Every group size that divides K gives the kernel's exact answer for its stored weights; smaller groups
    store the weights more finely."""
    torch.manual_seed(0)
    K, N = 256, 64
    x, w = torch.randn(2, K), torch.randn(K, N) * 0.05
    errs = []
    for g in (K, 128, 64, 32):
        fmt, q, s = stored(w, "int8", group=g)
        y = ops.conv1d(x, q, None, out_features=N, layout="panels", scales=s)
        assert_parity(y, *ref_mm(x, fmt.unpack(q, s), None), K, f"int8 group {g}")
        errs.append((fmt.unpack(q, s) - w.double()).pow(2).mean().item())
    assert errs == sorted(errs, reverse=True)


def test_lowp_bad_input():
    x, w = torch.randn(2, 64), torch.randn(64, 40)
    _, q, s = stored(w, "int8")
    _, h, _ = stored(w, "fp16")
    with pytest.raises(ValueError, match="needs its scales"):
        ops.conv1d(x, q, out_features=40, layout="panels")
    with pytest.raises(ValueError, match="only int8 weights take them"):
        ops.conv1d(x, h, out_features=40, layout="panels", scales=s)
    with pytest.raises(ValueError, match="scales must be"):
        ops.conv1d(x, q, out_features=40, layout="panels", scales=s[:, :, :16].contiguous())
    with pytest.raises(ValueError, match="scales must be"):  # groups that do not divide K
        ops.conv1d(x, q, out_features=40, layout="panels", scales=torch.ones(2, 3, 32))
    with pytest.raises(TypeError, match="scales must be Float"):
        ops.conv1d(x, q, out_features=40, layout="panels", scales=s.double())
    with pytest.raises(TypeError, match="must be float32"):  # HF's layout in place is fp32 only
        ops.conv1d(x, w.half())
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or int8"):
        ops.conv1d(x, h.double(), out_features=40, layout="panels")
    with pytest.raises(ValueError, match="int8 group must divide"):
        WeightFormat("panels", "int8", 64, 40, 48)
    with pytest.raises(ValueError, match="weights must be one of"):
        WeightFormat("panels", "int4", 64, 40)


@pytest.mark.parametrize("mode", LOWP)
def test_lowp_opcheck(mode):
    x, w, b = torch.randn(3, 64), torch.randn(64, 40), torch.randn(40)
    _, d, s = stored(w, mode)
    torch.library.opcheck(torch.ops.gpt2kern.conv1d, (x, d, b, "none", None, 40, "panels", s))


def test_nbytes():
    assert WeightFormat("kn", "fp32", 768, 2304).nbytes == 768 * 2304 * 4
    assert WeightFormat("panels", "fp16", 768, 2304).nbytes == 768 * 2304 * 2
    # int8: one byte per weight + one fp32 scale per 64 weights (columns padded to whole panels)
    assert WeightFormat("panels", "int8", 768, 50257, 64).nbytes == 768 * 1571 * 32 * (1 + 4 / 64)


def _bf16_dot_available():
    from gpt2kern import _C

    before = ops.isa()
    try:
        ops.set_isa("avx512")
    except ValueError:
        return False
    try:
        return _C.bf16_dot()
    finally:
        ops.set_isa(before)


@pytest.mark.skipif(not _bf16_dot_available(), reason="needs AVX512_BF16 (VDPBF16PS)")
@pytest.mark.parametrize("M,K,N", [(17, 768, 2304), (130, 3072, 768), (40, 768, 50257), (33, 65, 97), (20, 7, 40),
                                   (1100, 64, 100)])
@pytest.mark.parametrize("epi", ["none", "gelu_new", "residual"])
@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_bf16_dot_prefill_matches_float64_of_its_rounded_operands(M, K, N, epi, mode):
    """AVX512_BF16 prefill: x is rounded to bf16 too (its own error, reported by the bench beside the weights'),
    so the kernel is held to a float64 product of exactly the two rounded operands; odd K pads a zero pair."""
    from test_gelu import gelu_terms, ref_gelu

    from gpt2kern import _C

    before = ops.isa()
    ops.set_isa("avx512")
    try:
        torch.manual_seed(M + K)
        x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
        w, b, r = torch.randn(K, N) * 0.05, torch.randn(N), torch.randn(M, N)
        # int8: group 64, or the whole K where 64 does not divide it (odd K: an odd group, which the dot-product
        # path cannot pair: that case widens and keeps x in fp32)
        fmt, d, s = stored(w, mode, group=64 if K % 64 == 0 else K)
        rounded = mode == "bf16" or fmt.group % 2 == 0
        res = r if epi == "residual" else None
        y = ops.conv1d(x, d, b, epi, res, out_features=N, layout="panels", scales=s)
        pre, terms = ref_mm(x.bfloat16().float() if rounded else x, fmt.unpack(d, s), b)
        if epi == "gelu_new":
            assert_parity(y, ref_gelu(pre), 1.13 * terms + gelu_terms(pre), K, "bf16 dot + gelu")
        elif epi == "residual":
            assert_parity(y, pre + r.double(), terms + r.double().abs(), K, "bf16 dot + residual")
        else:
            assert_parity(y, pre, terms, K, "bf16 dot")
        # forbidden: the widening path, which keeps x in fp32 (a different, smaller error)
        _C.set_bf16_dot(False)
        try:
            assert not _C.bf16_dot()
            y2 = ops.conv1d(x, d, b, epi, res, out_features=N, layout="panels", scales=s)
        finally:
            _C.set_bf16_dot(True)
        pre2, terms2 = ref_mm(x, fmt.unpack(d, s), b)
        if epi == "none":
            assert_parity(y2, pre2, terms2, K, "bf16 widened")
    finally:
        ops.set_isa(before)


@pytest.mark.parametrize("mode", LOWP)
def test_decode_rows_do_not_depend_on_each_other(isa, mode):
    # on 16 registers a row gives the same bits alone or with other rows, although the rows share each widened chunk
    # of the panel (lowp_rows_shared keeps one row's arithmetic); on 32 registers tiles of <= 2 rows split k into
    # even and odd sums and larger tiles do not, so there a row's bits depend on its tile (as in HF's batched matmul)
    if isa == "avx512":
        pytest.skip("32 registers: a row's summation order depends on its tile's size")
    torch.manual_seed(6)
    K, N = 768, 100
    x = plant_outliers(torch.randn(16, K), channels=(3,), value=800.0)
    fmt, d, s = stored(torch.randn(K, N) * 0.05, mode)
    b = torch.randn(N)
    whole = ops.conv1d(x, d, b, "gelu_new", out_features=N, layout="panels", scales=s)
    for lo, hi in [(0, 1), (1, 3), (3, 8), (8, 16), (15, 16)]:
        part = ops.conv1d(x[lo:hi], d, b, "gelu_new", out_features=N, layout="panels", scales=s)
        assert torch.equal(part, whole[lo:hi]), (mode, lo, hi)
