"""int8 weights × int8 activations (csrc/cpu/kernels/matmul_int8dot.h): the quantizer bit for bit against its
definition in torch, the kernels against a float64 reference of exactly the quantized operands (every ISA table,
decode and prefill rows, every epilogue), rows independent of each other, non-finite input, and the switch."""
import pytest
import torch
from conftest import assert_parity, plant_outliers
from test_matmul_lowp import stored

from gpt2kern import _C, ops

HAS_KERNELS = _C.int8_dot_kernels() is not None
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="no int8 dot-product kernels here (needs x86 AVX2)")


def quantize_ref(x, G):
    """The definition: per row and group of G, amax = max|x|, q = round((x / amax) · 127) (nearest even), scale
    amax / 127 — in float32, as the kernels compute it."""
    M, K = x.shape
    xg = x.view(M, K // G, G)
    amax = xg.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, (xg / amax) * 127, torch.zeros_like(xg)).round()
    return q.to(torch.int8).view(M, K), (amax / 127).squeeze(-1)


def dequant(q, s):
    """x as the kernels multiply it, in float64 (exact: a 7-bit code times a float32 scale)."""
    M, K = q.shape
    G = K // s.shape[1]
    return (q.double().view(M, -1, G) * s.double().unsqueeze(-1)).view(M, K)


@pytest.fixture
def int8_dot_on():
    with ops.using_int8_dot(True):
        yield


@needs_kernels
@pytest.mark.parametrize("M,K,G", [(1, 768, 64), (3, 3072, 64), (5, 100, 4), (2, 96, 12), (40, 64, 64), (1, 8, 8)])
def test_quantizer_is_its_definition_bit_for_bit(M, K, G):
    torch.manual_seed(M + K + G)
    x = torch.randn(M, K) * torch.rand(M, 1) * 10
    x[0, : K // 2] = 0.0  # whole zero groups: scale 0, codes 0
    x[-1, 1] = 3000.0  # an outlier sets its group's scale
    if M > 1:
        x[1] *= 1e-30  # tiny values: (x / amax) stays exact where x · (127 / amax) would overflow
    q, s = _C.int8_quantize_rows(x, G)
    q2, s2 = quantize_ref(x, G)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert int(q.abs().max()) <= 127


@needs_kernels
def test_quantizer_marks_non_finite_groups():
    x = torch.randn(3, 128)
    x[0, 5], x[1, 70] = float("inf"), float("nan")
    q, s = _C.int8_quantize_rows(x, 64)
    assert s[0, 0].isnan() and s[1, 1].isnan() and torch.isfinite(s[0, 1]) and torch.isfinite(s[2]).all()
    assert (q[0, :64] == 0).all() and (q[1, 64:] == 0).all()


# decode rows (the AVX2 default), prefill rows, distilgpt2's projections, the lm_head's 50257 columns, odd N
SHAPES = [(1, 768, 2304), (2, 3072, 768), (8, 768, 3072), (16, 64, 100), (17, 768, 768), (130, 3072, 768),
          (3, 768, 50257), (29, 128, 97), (1, 64, 1)]


@needs_kernels
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_int8_dot_matches_float64_of_its_quantized_operands(int8_dot_on, M, K, N):
    torch.manual_seed(M * 5 + N)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
    w, b = torch.randn(K, N) * 0.05, torch.randn(N)
    fmt, d, s = stored(w, "int8")
    assert _C.matmul_strategy("panels", "int8", M, fmt.group) == "int8_dot"
    y = ops.conv1d(x, d, b, out_features=N, layout="panels", scales=s)
    xq = dequant(*quantize_ref(x, fmt.group))
    wq = fmt.unpack(d, s).double()
    ref = xq @ wq + b.double()
    terms = xq.abs() @ wq.abs() + b.double().abs()
    assert_parity(y, ref, terms, K, f"int8_dot {M}x{K}x{N}")


@needs_kernels
@pytest.mark.parametrize("M", [1, 5, 40])
def test_int8_dot_epilogues(int8_dot_on, M):
    from test_gelu import gelu_terms, ref_gelu

    torch.manual_seed(11)
    K, N = 192, 100
    x, w, b, r = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N), plant_outliers(torch.randn(M, N))
    fmt, d, s = stored(w, "int8")
    xq, wq = dequant(*quantize_ref(x, fmt.group)), fmt.unpack(d, s).double()
    pre, terms = xq @ wq + b.double(), xq.abs() @ wq.abs() + b.double().abs()
    y = ops.conv1d(x, d, b, "gelu_new", out_features=N, layout="panels", scales=s)
    assert_parity(y, ref_gelu(pre), 1.13 * terms + gelu_terms(pre), K, "int8_dot+gelu_new")
    y = ops.conv1d(x, d, b, "residual", r, out_features=N, layout="panels", scales=s)
    assert_parity(y, pre + r.double(), terms + r.double().abs(), K, "int8_dot+residual")


@needs_kernels
def test_rows_do_not_depend_on_each_other(int8_dot_on):
    # each row's quantization and sums are its own: a row gives the same bits alone, in a decode batch or in a
    # prefill (speculative decoding's verify and the engine's batches rely on it)
    torch.manual_seed(3)
    K, N = 768, 300
    x = plant_outliers(torch.randn(37, K), channels=(5,), value=500.0)
    fmt, d, s = stored(torch.randn(K, N) * 0.05, "int8")
    b = torch.randn(N)
    whole = ops.conv1d(x, d, b, out_features=N, layout="panels", scales=s)
    for lo, hi in [(0, 1), (3, 5), (7, 16), (16, 37)]:
        part = ops.conv1d(x[lo:hi], d, b, out_features=N, layout="panels", scales=s)
        assert torch.equal(part, whole[lo:hi]), (lo, hi)


@needs_kernels
def test_non_finite_x_gives_nan_rows_not_finite_numbers(int8_dot_on):
    torch.manual_seed(4)
    K, N = 128, 64
    x = torch.randn(4, K)
    x[1, 3], x[2, 100] = float("inf"), float("nan")
    fmt, d, s = stored(torch.randn(K, N) * 0.05, "int8")
    y = ops.conv1d(x, d, None, out_features=N, layout="panels", scales=s)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


def test_generic_table_has_no_int8_dot_kernels(int8_dot_on):
    before = ops.isa()
    ops.set_isa("generic")
    try:
        assert ops.int8_dot_kernels() is None and not ops.int8_dot()
        assert _C.matmul_strategy("panels", "int8", 1, 64) == "lowp_decode"
    finally:
        ops.set_isa(before)


@needs_kernels
def test_the_switch():
    with ops.using_int8_dot(False):
        assert not ops.int8_dot() and _C.matmul_strategy("panels", "int8", 1, 64) == "lowp_decode"
        assert _C.matmul_strategy("panels", "int8", 200, 64) in ("convert_per_block", "bf16_dot_prefill")
        with ops.using_int8_dot(True):
            assert ops.int8_dot(1) and ops.int8_dot(200) and _C.int8_dot_mode() == "on"
            assert _C.matmul_strategy("panels", "int8", 1, 64) == "int8_dot"
            assert _C.matmul_strategy("panels", "int8", 200, 64) == "int8_dot"
        assert _C.int8_dot_mode() == "off"
        # auto: prefill rows only, and only where the kernels prefill over packed panels (AVX512-VNNI)
        with ops.using_int8_dot(None):
            assert _C.int8_dot_mode() == "auto" and not ops.int8_dot(1) and not ops.int8_dot(16)
            assert ops.int8_dot(17) == _C.int8_dot_packed() == ops.int8_dot(200)
            assert _C.matmul_strategy("panels", "int8", 1, 64) == "lowp_decode"
            want = "int8_dot" if _C.int8_dot_packed() else ("convert_per_block", "bf16_dot_prefill")
            assert _C.matmul_strategy("panels", "int8", 200, 64) in want
    with pytest.raises(ValueError, match="mode must be 'off', 'on' or 'auto'"):
        _C.set_int8_dot("yes")


def test_auto_by_default_and_from_the_environment(tmp_path):
    # a fresh process: auto (prefill where the packed kernels run: measured faster, within int8's bound), on with
    # GPT2KERN_INT8_DOT=1, off with 0
    import os
    import subprocess
    import sys

    code = "import torch; from gpt2kern import _C; print(_C.int8_dot_mode())"
    env = {k: v for k, v in os.environ.items() if k != "GPT2KERN_INT8_DOT"}
    for val, want in ((None, "auto"), ("1", "on"), ("0", "off"), ("yes", "auto")):
        e = dict(env, **({"GPT2KERN_INT8_DOT": val} if val else {}))
        out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, (val, out.stdout, out.stderr[-500:])


def test_int8_dot_needs_a_group_of_four():
    # the kernels take k in quads: other groups widen the weights as before
    assert _C.matmul_strategy("panels", "int8", 1, 64, int8_dot=True) == "int8_dot"
    assert _C.matmul_strategy("panels", "int8", 200, 64, int8_dot=True) == "int8_dot"
    assert _C.matmul_strategy("panels", "int8", 1, 6, int8_dot=True) == "lowp_decode"
    assert _C.matmul_strategy("panels", "int8", 1, 64, int8_dot=False) == "lowp_decode"
    assert _C.matmul_strategy("panels", "bf16", 1, 0, int8_dot=True) == "lowp_decode"


@needs_kernels
def test_int8_dot_kernels_name_this_cpu():
    # the avx512 table takes AVX512-VNNI first (its prefill kernel is 512 bits wide); the avx2 table 256-bit VNNI
    flags = open("/proc/cpuinfo").read().split()
    vnni256 = "avxvnni" if "avx_vnni" in flags else "avx2"
    want = "avx512vnni" if ops.isa() == "avx512" and "avx512_vnni" in flags else vnni256
    assert _C.int8_dot_kernels() == want
    assert _C.int8_dot_packed() == (want == "avx512vnni")
    if "avx2" in ops.supported_isas():
        before = ops.isa()
        ops.set_isa("avx2")
        try:
            assert _C.int8_dot_kernels() == vnni256 and not _C.int8_dot_packed()
        finally:
            ops.set_isa(before)


@needs_kernels
@pytest.mark.parametrize("M", [1, 7, 40])
def test_every_int8_dot_kernel_gives_the_same_bits(int8_dot_on, M):
    # the integer sums are exact and every kernel scales them by the same expression, so the ISA tables' kernels
    # (AVX512-VNNI's 512-bit prefill over packed panels among them) agree bit for bit
    isas = [i for i in ops.supported_isas() if i != "generic"]
    if len(isas) < 2:
        pytest.skip("one ISA table with int8 dot kernels on this CPU")
    torch.manual_seed(M)
    K, N = 768, 200
    x = plant_outliers(torch.randn(M, K), channels=(9,), value=900.0)
    fmt, d, s = stored(torch.randn(K, N) * 0.05, "int8")
    b = torch.randn(N)
    before, outs = ops.isa(), {}
    try:
        for isa in isas:
            ops.set_isa(isa)
            outs[_C.int8_dot_kernels()] = ops.conv1d(x, d, b, "gelu_new", out_features=N, layout="panels", scales=s)
    finally:
        ops.set_isa(before)
    first = next(iter(outs.values()))
    for name, y in outs.items():
        assert torch.equal(y, first), name


@needs_kernels
def test_bad_quantize_arguments():
    with pytest.raises(ValueError, match="group must divide"):
        _C.int8_quantize_rows(torch.randn(2, 10), 4)
    with pytest.raises(TypeError, match="must be Float"):
        _C.int8_quantize_rows(torch.randn(2, 8).double(), 4)
