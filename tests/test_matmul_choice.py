"""Which strategy the CPU matmul runs (csrc/cpu/matmul.cpp's choose_matmul), stated as a table over every
(layout, dtype, rows) cell, and each strategy checked against a float64 reference at one shape that takes it."""
import pytest
import torch
from conftest import assert_parity, plant_outliers
from test_matmul import ref_mm, weight_as
from test_matmul_lowp import stored

from gpt2kern import _C, ops

ROWS = (1, 2, 3, 16, 17, 128)
DTYPES = ("fp32", "fp16", "bf16", "int8")

# (layout, dtype) -> the strategy per entry of ROWS; int8 with an even group (64). None: the CPU does not read that
# format (its in-place layouts are fp32 only). Up to 16 rows is decode, except HF's [K, N], whose GEMV serves up to
# the kernel table's limit (kn_gemv_limit; the entry here is the portable table's).
_DEC, _PRE = 4, 2  # ROWS up to 16, above 16
TABLE = {
    ("nk", "fp32"): ["nk_decode"] * _DEC + ["nk_prefill"] * _PRE,
    ("kn", "fp32"): ["kn_decode_gemv"] * 3 + ["convert_per_block"] * 3,
    ("panels", "fp32"): ["panels_f32"] * 6,
    ("panels", "fp16"): ["lowp_decode"] * _DEC + ["convert_per_block"] * _PRE,
    ("panels", "bf16"): ["lowp_decode"] * _DEC + ["convert_per_block"] * _PRE,
    ("panels", "int8"): ["lowp_decode"] * _DEC + ["convert_per_block"] * _PRE,
}
# where the CPU has the AVX512_BF16 kernels (avx512 ISA) and they are allowed: bf16 and even-group int8 prefill
BF16_DOT = {**TABLE,
            ("panels", "bf16"): ["lowp_decode"] * _DEC + ["bf16_dot_prefill"] * _PRE,
            ("panels", "int8"): ["lowp_decode"] * _DEC + ["bf16_dot_prefill"] * _PRE}
# where the int8 dot-product kernels run for those rows (int8_dot: a group of 4k), whatever bf16_dot says
INT8_DOT = ["int8_dot"] * 6


def kn_gemv_limit(isa):
    """Rows up to which HF's [K, N] fp32 weight is read in place by the GEMV: 16 on AVX-512's 32 vector registers,
    8 on the other tables' 16 (measured, bench/RESULTS.md)."""
    return 16 if isa == "avx512" else 8


def strategy(layout, dtype, rows, group=None, bf16_dot=None, int8_dot=None):
    g = (64 if group is None else group) if dtype == "int8" else 0
    return _C.matmul_strategy(layout, dtype, rows, g, bf16_dot=bf16_dot, int8_dot=int8_dot)


@pytest.mark.parametrize("int8_dot", [False, True])
@pytest.mark.parametrize("bf16_dot", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["kn", "nk", "panels"])
def test_strategy_table(layout, dtype, bf16_dot, int8_dot):
    want = (BF16_DOT if bf16_dot else TABLE).get((layout, dtype))
    if (layout, dtype) == ("kn", "fp32"):
        want = ["kn_decode_gemv" if r <= kn_gemv_limit(_C.isa()) else "convert_per_block" for r in ROWS]
    if int8_dot and (layout, dtype) == ("panels", "int8"):
        want = INT8_DOT
    for i, rows in enumerate(ROWS):
        if want is None:
            with pytest.raises(TypeError, match="must be fp32 on the CPU"):
                strategy(layout, dtype, rows, bf16_dot=bf16_dot, int8_dot=int8_dot)
        else:
            assert strategy(layout, dtype, rows, bf16_dot=bf16_dot, int8_dot=int8_dot) == want[i], (layout, dtype, rows)


@pytest.mark.parametrize("int8_dot", [False, True])
@pytest.mark.parametrize("bf16_dot", [False, True])
def test_int8_odd_group_never_takes_the_dot_product_kernels(bf16_dot, int8_dot):
    # an odd group cannot be paired for VDPBF16PS nor split into quads for the int8 kernels: it widens to fp32 like
    # fp16
    got = [strategy("panels", "int8", r, group=3, bf16_dot=bf16_dot, int8_dot=int8_dot) for r in ROWS]
    assert got == TABLE[("panels", "fp16")]


def test_default_is_this_cpu():
    for layout, dtype in TABLE:
        for rows in ROWS:
            assert strategy(layout, dtype, rows) == strategy(layout, dtype, rows, bf16_dot=_C.bf16_dot(),
                                                             int8_dot=_C.int8_dot(rows))


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout must be"):
        _C.matmul_strategy("KN", "fp32", 1)
    with pytest.raises(ValueError, match="dtype must be"):
        _C.matmul_strategy("panels", "float32", 1)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        _C.matmul_strategy("panels", "fp32", 0)
    with pytest.raises(ValueError, match="int8 needs its group"):
        _C.matmul_strategy("panels", "int8", 1)


# one shape per strategy (K past the strategy's K block or row block where it has one), on every ISA level here
CASES = [  # (strategy, layout, dtype, M, K, N)
    ("nk_decode", "nk", "fp32", 3, 100, 97),
    ("nk_prefill", "nk", "fp32", 40, 100, 97),
    ("lowp_decode", "panels", "int8", 5, 128, 97),
    ("int8_dot", "panels", "int8", 5, 128, 97),
    ("int8_dot", "panels", "int8", 40, 256, 97),
    ("kn_decode_gemv", "kn", "fp32", 2, 300, 97),
    ("kn_decode_gemv", "kn", "fp32", 7, 300, 97),
    ("panels_f32", "panels", "fp32", 40, 1100, 97),
    ("convert_per_block", "kn", "fp32", 40, 800, 97),
    ("convert_per_block", "panels", "fp16", 20, 800, 70),
]


@pytest.mark.parametrize("name,layout,dtype,M,K,N", CASES)
def test_each_strategy_matches_float64(isa, name, layout, dtype, M, K, N, request):
    if dtype == "int8":  # the int8 switch decides between lowp_decode and int8_dot
        before = _C.int8_dot_mode()
        _C.set_int8_dot("on" if name == "int8_dot" else "off")
        request.addfinalizer(lambda: _C.set_int8_dot(before))
        if name == "int8_dot" and _C.int8_dot_kernels() is None:
            pytest.skip(f"no int8 dot-product kernels under the {isa} table")
    assert strategy(layout, dtype, M) == name
    torch.manual_seed(M * 5 + K)
    x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
    w, b = torch.randn(K, N) * 0.05, torch.randn(N)
    if dtype == "fp32":
        wd, lay = weight_as(w, layout, "cpu")
        assert lay == layout
        y, ref = ops.conv1d(x, wd, b, out_features=N, layout=layout), ref_mm(x, w, b)
    else:
        fmt, d, s = stored(w, dtype)
        y = ops.conv1d(x, d, b, out_features=N, layout="panels", scales=s)
        if name == "int8_dot":  # x as the kernels multiply it: quantized per row and group
            from test_matmul_int8dot import dequant, quantize_ref
            x = dequant(*quantize_ref(x, fmt.group))
        ref = ref_mm(x, fmt.unpack(d, s), b)
    assert_parity(y, *ref, K, f"{name} {M}x{K}x{N}")


def test_kn_gemv_limit_is_the_tables(isa):
    # at the limit the GEMV, one row past it the panels; the GEMV's most rows against float64 too
    limit = kn_gemv_limit(isa)
    assert [strategy("kn", "fp32", r) for r in (limit, limit + 1)] == ["kn_decode_gemv", "convert_per_block"]
    torch.manual_seed(limit)
    x, w, b = torch.randn(limit, 300), torch.randn(300, 97) * 0.05, torch.randn(97)
    y = ops.conv1d(x, w, b, out_features=97, layout="kn")
    assert_parity(y, *ref_mm(x, w, b), 300, f"kn_decode_gemv {limit} rows, {isa}")


def _with_bf16_dot():
    if "avx512" not in ops.supported_isas():
        return False
    before = ops.isa()
    ops.set_isa("avx512")
    try:
        return _C.bf16_dot()
    finally:
        ops.set_isa(before)


@pytest.mark.skipif(not _with_bf16_dot(), reason="needs AVX512_BF16 (VDPBF16PS)")
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bf16_dot_prefill_matches_float64(dtype):
    # int8's bf16 prefill: with the int8 dot products off (or where they do not pack)
    before = ops.isa()
    ops.set_isa("avx512")
    try:
        M, K, N = 40, 800, 97
        torch.manual_seed(7)
        x = plant_outliers(torch.randn(M, K), channels=(0,), value=3000.0)
        w, b = torch.randn(K, N) * 0.05, torch.randn(N)
        fmt, d, s = stored(w, dtype, group=32)
        with ops.using_int8_dot(False):
            assert strategy("panels", dtype, M) == "bf16_dot_prefill"
            y = ops.conv1d(x, d, b, out_features=N, layout="panels", scales=s)
        # x is rounded to bf16 too: the kernel is held to a float64 product of the two rounded operands
        assert_parity(y, *ref_mm(x.bfloat16().float(), fmt.unpack(d, s), b), K, f"bf16_dot_prefill {dtype}")
    finally:
        ops.set_isa(before)
