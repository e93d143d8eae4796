import contextlib

import pytest
import torch
from conftest import DEVICES, assert_parity, needs_cuda

from gpt2kern import ops


def ref_attention(q, k, v, key_mask=None, bias=None, scale=1.0, q_offset=0, causal=True):
    """float64 softmax attention; rows that see no key are zeros. Returns ([B, Tq, H, D], absterms)."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, Tkv = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    s_abs = (q.abs() @ k.abs().transpose(-1, -2)) * scale
    visible = torch.ones(q.shape[0], 1, Tq, Tkv, dtype=torch.bool)
    if causal:
        visible &= (torch.arange(Tkv)[None, :] <= q_offset + torch.arange(Tq)[:, None])
    if key_mask is not None:
        km = torch.zeros(q.shape[0], Tkv, dtype=torch.bool)
        km[:, : key_mask.shape[1]] = key_mask[:, :Tkv]
        visible = visible & km[:, None, None, :]
    if bias is not None:
        bb = torch.full((*bias.shape[:3], Tkv), float("-inf"), dtype=torch.float64)
        bb[..., : bias.shape[3]] = bias.double()[..., :Tkv]
        s = s + bb
        visible = visible & (bb > float("-inf"))
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = (p @ v).transpose(1, 2)
    # softmax amplifies score errors: an error δ in every score moves the output by ~δ·|v|
    terms = ((p @ v.abs()) * (1 + (s_abs.masked_fill(~visible, 0).amax(-1, keepdim=True)))).transpose(1, 2)
    return out, terms


def qkv(B, H, Tq, Tkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, D, generator=g), torch.randn(B, H, Tkv, D, generator=g),
            torch.randn(B, H, Tkv, D, generator=g))


CASES = [  # B, H, Tq, Tkv, D, q_offset
    (1, 12, 1, 1, 64, 0), (1, 12, 1, 37, 64, 36), (2, 12, 7, 7, 64, 0), (3, 2, 5, 12, 16, 7),
    (1, 4, 33, 33, 64, 0), (2, 3, 17, 50, 20, 33), (1, 2, 1024, 1024, 64, 0), (4, 12, 1, 1024, 64, 1023),
]


@pytest.mark.parametrize("B,H,Tq,Tkv,D,off", CASES)
def test_causal_matches_float64(device, B, H, Tq, Tkv, D, off):
    if Tq * Tkv > 100_000 and device == "cpu" and ops.isa() != "avx512":
        pytest.skip("long case on the best ISA only")
    q, k, v = qkv(B, H, Tq, Tkv, D)
    scale = D ** -0.5
    out = ops.attention(q.to(device), k.to(device), v.to(device), None, None, scale, off, True)
    assert_parity(out, *ref_attention(q, k, v, scale=scale, q_offset=off), max(Tkv, D), "attention")


def test_left_padding_and_fully_masked_rows(device):
    B, H, T, D = 3, 2, 9, 16
    q, k, v = qkv(B, H, T, T, D, 1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, :8] = False  # one valid token
    out = ops.attention(q.to(device), k.to(device), v.to(device), mask.to(device), None, 0.25, 0, True).cpu()
    ref, terms = ref_attention(q, k, v, key_mask=mask, scale=0.25)
    assert torch.isfinite(out).all()
    assert (out[1, :4] == 0).all() and (out[2, :8] == 0).all()  # pad query rows see nothing: zeros
    assert_parity(out, ref, terms, T, "padded attention")


@pytest.mark.parametrize("dev", DEVICES)
def test_all_padded_is_zero_not_nan(dev):
    q, k, v = (t.to(dev) for t in qkv(2, 2, 3, 3, 8, 2))
    out = ops.attention(q, k, v, torch.zeros(2, 3, dtype=torch.bool, device=dev), None, 1.0, 0, True)
    assert (out == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("Tq", [1, 3])
def test_mask_or_bias_of_length_zero_shows_no_key(dev, Tq):
    """A key_mask [B, 0] or bias [.., 0] covers no key, so every row sees none: zeros (an empty mask's data
    pointer is null, which once read as 'no mask')."""
    q, k, v = (t.to(dev) for t in qkv(2, 2, Tq, 5, 8, 3))
    for km, bias in ((torch.zeros(2, 0, dtype=torch.bool, device=dev), None),
                     (None, torch.zeros(2, 1, Tq, 0, device=dev))):
        out = ops.attention(q, k, v, km, bias, 1.0, 0, False)
        assert out.shape == (2, Tq, 2, 8) and (out == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("Tq,Tkv", [(1, 1), (1, 40), (3, 70), (40, 40)])
def test_nan_score_propagates(dev, Tq, Tkv):
    """A NaN among a row's visible scores makes the row NaN, as softmax over it does in HF, also when it is the
    row's only visible score (decode and short prompts split the keys over warps on CUDA), while rows that
    never see it stay finite."""
    q, k, v = qkv(1, 2, Tq, Tkv, 8, 4)
    k[0, 0, 0, 0] = float("nan")  # key 0 of head 0: every causal row sees it
    km = torch.zeros(1, Tkv, dtype=torch.bool)
    km[0, 0] = True  # ... and it is the only key anyone sees
    for mask in (None, km):
        out = ops.attention(q.to(dev), k.to(dev), v.to(dev), None if mask is None else mask.to(dev), None, 1.0,
                            Tkv - Tq, True).cpu()
        assert out[0, :, 0].isnan().all() and out[0, :, 1].isfinite().all()


def _nan_bias_case(Tq):
    q, k, v = qkv(1, 2, Tq, 40, 8, 7)
    km = torch.ones(1, 40, dtype=torch.bool)
    km[0, 2] = False
    bias = torch.zeros(1, 1, Tq, 40)
    bias[0, 0, :, 2] = float("nan")
    return q, k, v, km, bias, torch.arange(Tq) >= 2  # causal row i sees key 2 when i >= 2


@pytest.mark.parametrize("Tq", [1, 3, 4, 9, 40])
def test_nan_bias_on_a_masked_key_spreads(isa, Tq):
    """HF eager adds the padding mask to the scores, so a NaN in the additive bias reaches the softmax even where
    the key is padding: the rows that may see that key (causally) come out NaN, the rows before it stay finite.
    Keys past a row's causal limit are not read at all. CUDA: the twin below."""
    q, k, v, km, bias, sees = _nan_bias_case(Tq)
    out = ops.attention(q, k, v, km, bias, 1.0, 0, True)
    assert out[0, sees].isnan().all() and out[0, ~sees].isfinite().all()


@needs_cuda
@pytest.mark.parametrize("Tq", [1, 3, 4, 9, 40])
def test_nan_bias_on_a_masked_key_spreads_cuda(Tq):
    q, k, v, km, bias, sees = _nan_bias_case(Tq)
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), km.cuda(), bias.cuda(), 1.0, 0, True).cpu()
    assert out[0, sees].isnan().all() and out[0, ~sees].isfinite().all()
    bias[0, 0, :, 2] = 5.0  # a finite bias on a masked key leaves it hidden
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), km.cuda(), bias.cuda(), 1.0, 0, True)
    assert_parity(out, *ref_attention(q, k, v, key_mask=km, bias=bias, scale=1.0), 40, "finite bias, masked key")


def test_additive_bias_non_causal(device):
    B, H, Tq, Tkv, D = 2, 3, 4, 11, 16
    q, k, v = qkv(B, H, Tq, Tkv, D, 3)
    bias = torch.randn(B, 1, Tq, Tkv)
    bias[0, 0, 1, 5:] = float("-inf")
    bias[1, 0, 2, :] = float("-inf")  # a fully masked row
    out = ops.attention(q.to(device), k.to(device), v.to(device), None, bias.to(device), 0.3, 0, False).cpu()
    assert (out[1, 2] == 0).all()
    assert_parity(out, *ref_attention(q, k, v, bias=bias, scale=0.3, causal=False), Tkv)


@pytest.mark.parametrize("dev", DEVICES)
def test_static_cache_shape_and_strided_q(dev):
    # a preallocated cache longer than the sequence; q a view into a fused qkv buffer as the model passes it
    B, H, T, D, Lmax = 2, 4, 6, 16, 40
    qkv_buf = torch.randn(B, T, 3 * H * D)
    q = qkv_buf[..., : H * D].view(B, T, H, D).transpose(1, 2)
    _, k, v = qkv(B, H, T, Lmax, D, 4)
    k[:, :, T + 5:] = float("nan")  # never-written slots must not be read
    qd = qkv_buf.to(dev)[..., : H * D].view(B, T, H, D).transpose(1, 2)
    out = ops.attention(qd, k.to(dev), v.to(dev), None, None, 0.25, 5, True)
    ref, terms = ref_attention(q, k[:, :, : T + 5], v[:, :, : T + 5], scale=0.25, q_offset=5)
    assert_parity(out, ref, terms, T + 5)


@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(dev):
    q, k, v = (t.to(dev) for t in qkv(2, 2, 3, 5, 8))
    m = torch.ones(2, 5, dtype=torch.bool, device=dev)
    torch.library.opcheck(torch.ops.gpt2kern.attention, (q, k, v, m, None, 0.5, 2, True))
    torch.library.opcheck(torch.ops.gpt2kern.attention,
                          (q, k, v, None, torch.zeros(2, 1, 3, 5, device=dev), 0.5, 0, False))


def test_bad_input():
    q, k, v = qkv(1, 2, 3, 5, 8)
    with pytest.raises(ValueError, match="need at least 8 keys"):
        ops.attention(q, k, v, None, None, 1.0, 5, True)
    with pytest.raises(ValueError, match="k must be"):
        ops.attention(q, k[:, :1], v[:, :1], None, None, 1.0, 0, True)
    with pytest.raises(TypeError, match="key_mask must be Bool"):
        ops.attention(q, k, v, torch.ones(1, 5), None, 1.0, 0, True)
    with pytest.raises(ValueError, match="4-D"):
        ops.attention(q[0], k, v, None, None, 1.0, 0, True)


# ---------------------------------------------------------------- CUDA prefill attention variant 2 (FlashAttention-2)
# ops.cuda_variant("prefill_attention", 2) makes the attention op run csrc/cuda/attention.cu's flash_prefill_kernel
# wherever it applies (D 32 or 64, no bias, >= 16 query rows, aligned rows) and variant 1 everywhere else. Its row
# tile follows the grid: 64 rows when B·H·ceil(Tq/64) blocks give every SM one, else 32, else 16 (the comments say
# which on a 132-SM H100/H200). The small cases run under compute-sanitizer too (bench/gpu_check.sh), the long ones
# (test_flash_attention_long_cuda) do not.

@contextlib.contextmanager
def attention_variant(v):
    """The prefill attention variant set to v inside, the previous one restored after (also on an error)."""
    before = ops.cuda_variant("prefill_attention")
    ops.cuda_variant("prefill_attention", v)
    try:
        yield v
    finally:
        ops.cuda_variant("prefill_attention", before)


@pytest.fixture
def flash_attention():
    with attention_variant(2) as v:
        yield v


@pytest.mark.skipif(not ops.has_cuda(), reason="built without the CUDA kernels")
def test_flash_attention_knob_cuda():
    # no GPU needed: the knob lives in the extension; variant 2 exists (the live default may be a GPU's measured one,
    # kernels/cuda_table.py, so only its range is checked)
    before = ops.cuda_variant("prefill_attention")
    assert before in (1, 2)
    with attention_variant(2):
        assert ops.cuda_variant("prefill_attention") == 2
        with pytest.raises(ValueError, match="variants 1 to 2, got 3"):
            ops.cuda_variant("prefill_attention", 3)
        assert ops.cuda_variant("prefill_attention") == 2
    assert ops.cuda_variant("prefill_attention") == before
    with pytest.raises(KeyError), attention_variant(2):
        raise KeyError("restored on an error too")
    assert ops.cuda_variant("prefill_attention") == before


def _flash_parity(B, H, Tq, Tkv, D, off, seed=11):
    q, k, v = qkv(B, H, Tq, Tkv, D, seed)
    scale = D ** -0.5
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), None, None, scale, off, True)
    assert_parity(out, *ref_attention(q, k, v, scale=scale, q_offset=off), max(Tkv, D),
                  f"flash attention B={B} H={H} Tq={Tq} Tkv={Tkv} D={D} off={off}")


@needs_cuda
@pytest.mark.parametrize("B,H,Tq,Tkv,D,off", [
    (1, 2, 16, 16, 64, 0),     # the fewest rows variant 2 takes, one 16-row tile
    (2, 3, 65, 65, 64, 0),     # ragged row tiles, a second key tile of one key
    (1, 2, 130, 130, 64, 0),   # three key tiles, the causal diagonal in each (racecheck's case)
    (6, 12, 40, 40, 64, 0),    # 32-row tiles
    (12, 12, 80, 80, 64, 0),   # 64-row tiles, the last one ragged
    (3, 5, 40, 70, 32, 30),    # head dim 32, prefix cache (q_offset > 0)
    (6, 12, 40, 50, 32, 10),   # head dim 32, 32-row tiles
    (12, 12, 70, 100, 32, 30),  # head dim 32, 64-row tiles
])
def test_flash_attention_cuda(flash_attention, B, H, Tq, Tkv, D, off):
    _flash_parity(B, H, Tq, Tkv, D, off)


@needs_cuda
@pytest.mark.parametrize("B,H,Tq,Tkv,D,off", [
    (1, 12, 1, 1, 64, 0),          # one row: variant 1
    (1, 12, 17, 17, 64, 0),
    (1, 12, 63, 63, 64, 0),
    (1, 12, 64, 64, 64, 0),
    (2, 12, 65, 65, 64, 0),
    (1, 25, 129, 129, 64, 0),
    (1, 12, 512, 512, 64, 0),      # 32-row tiles
    (1, 12, 1024, 1024, 64, 0),    # 64-row tiles
    (1, 25, 1024, 1024, 64, 0),
    (2, 12, 1100, 1100, 64, 0),
    (1, 12, 300, 700, 64, 400),    # long prefix, ragged
    (2, 12, 200, 1024, 32, 824),
    (2, 4, 50, 50, 80, 0),         # head dim 80: variant 1
])
def test_flash_attention_long_cuda(flash_attention, B, H, Tq, Tkv, D, off):
    _flash_parity(B, H, Tq, Tkv, D, off)


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_key_mask_cuda(flash_attention, causal):
    # left padding, a row with one valid key, a row with none, a mask longer than Tkv; V of masked keys is NaN
    # (variant 1 never reads it into the output: neither may variant 2)
    B, H, Tq, Tkv, D, off = 4, 12, 40, 100, 64, 60
    q, k, v = qkv(B, H, Tq, Tkv, D, 12)
    mask = torch.ones(B, Tkv + 7, dtype=torch.bool)
    mask[1, :30] = False
    mask[2, :99] = False
    mask[3] = False
    v[~mask[:, None, :Tkv, None].expand(B, H, Tkv, D)] = float("nan")
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), mask.cuda(), None, 0.125, off, causal).cpu()
    assert (out[3] == 0).all()  # every key masked: zeros, as variant 1
    if causal:
        assert (out[2, : 99 - off] == 0).all()  # rows before the one valid key see nothing
    ref, terms = ref_attention(q, k, v.nan_to_num(0.0), key_mask=mask, scale=0.125, q_offset=off, causal=causal)
    assert_parity(out, ref, terms, Tkv, "flash attention, key_mask")


@needs_cuda
def test_flash_attention_qkv_views_cuda(flash_attention):
    # q, k, v as the model passes them: views of c_attn's output [B, T, 3E], heads strided, not contiguous
    B, H, T, D = 2, 12, 100, 64
    E = H * D
    buf = torch.randn(B, T, 3 * E, generator=torch.Generator().manual_seed(13))
    q, k, v = (buf[..., i * E:(i + 1) * E].view(B, T, H, D).transpose(1, 2) for i in range(3))
    dev = buf.cuda()
    qd, kd, vd = (dev[..., i * E:(i + 1) * E].view(B, T, H, D).transpose(1, 2) for i in range(3))
    assert not qd.is_contiguous()
    out = ops.attention(qd, kd, vd, None, None, 0.125, 0, True)
    assert_parity(out, *ref_attention(q, k, v, scale=0.125), T, "flash attention, qkv views")


@needs_cuda
def test_flash_attention_static_cache_cuda(flash_attention):
    # a cache longer than the keys in use, never-written slots NaN: never read
    B, H, T, D, off, Lmax = 2, 4, 20, 64, 5, 200
    q, k, v = qkv(B, H, T, Lmax, D, 14)
    k[:, :, T + off:] = float("nan")
    v[:, :, T + off:] = float("nan")
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), None, None, 0.125, off, True)
    ref, terms = ref_attention(q, k[:, :, : T + off], v[:, :, : T + off], scale=0.125, q_offset=off)
    assert_parity(out, ref, terms, T + off, "flash attention, static cache")


@needs_cuda
def test_flash_attention_nan_score_propagates_cuda(flash_attention):
    # as test_nan_score_propagates, at a shape variant 2 takes
    q, k, v = qkv(1, 2, 40, 40, 64, 15)
    k[0, 0, 0, 0] = float("nan")
    km = torch.zeros(1, 40, dtype=torch.bool)
    km[0, 0] = True
    for mask in (None, km):
        out = ops.attention(q.cuda(), k.cuda(), v.cuda(), None if mask is None else mask.cuda(), None, 1.0, 0,
                            True).cpu()
        assert out[0, :, 0].isnan().all() and out[0, :, 1].isfinite().all()


def _fallback_case(case):
    """(q, k, v, bias, q_offset) on the GPU for a call variant 2 does not take."""
    B, H, T, D, off = 2, 3, 40, 64, 0
    q, k, v = (t.cuda() for t in qkv(B, H, T, T, D, 16))
    bias = None
    if case == "one_row":
        q, off = q[:, :, -1:], T - 1
    elif case == "head_dim_80":
        q, k, v = (t.cuda() for t in qkv(B, H, T, T, 80, 16))
    elif case == "bias":
        bias = torch.randn(B, 1, T, T).cuda()
    elif case == "misaligned":  # views made on the GPU (a copy would be aligned): rows 4 bytes off 16-byte alignment
        buf = torch.randn(B, H, T, 3 * D + 1).cuda()
        q, k, v = (buf[..., 1 + i * D: 1 + (i + 1) * D] for i in range(3))
        assert q.data_ptr() % 16 != 0
    return q, k, v, bias, off


@needs_cuda
@pytest.mark.parametrize("case", ["one_row", "head_dim_80", "bias", "misaligned"])
def test_flash_attention_falls_back_to_variant_1_cuda(case):
    q, k, v, bias, off = _fallback_case(case)
    args = (q, k, v, None, bias, 0.125, off, True)
    with attention_variant(1):
        one = ops.attention(*args)
    with attention_variant(2):
        two = ops.attention(*args)
    assert torch.equal(one, two)  # variant 1 ran for both: bitwise its result
    ref, terms = ref_attention(q.cpu(), k.cpu(), v.cpu(), bias=None if bias is None else bias.cpu(), scale=0.125,
                               q_offset=off)
    assert_parity(two, ref, terms, q.shape[-2] + off)


@needs_cuda
def test_flash_attention_is_another_kernel_cuda():
    # where variant 2 applies the knob switches kernels: another summation order, so not bitwise variant 1's
    q, k, v = (t.cuda() for t in qkv(1, 12, 256, 256, 64, 17))
    with attention_variant(1):
        one = ops.attention(q, k, v, None, None, 0.125, 0, True)
    with attention_variant(2):
        two = ops.attention(q, k, v, None, None, 0.125, 0, True)
    assert not torch.equal(one, two)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
