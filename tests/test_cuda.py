"""CUDA: the build guard (runs everywhere), then CUDA-only kernel cases, device checks, the optimized model on CUDA
vs HF eager, and the CUDA-graph decoder vs HF generate. The per-op parity tests run on CUDA too, through the
`device` fixture / DEVICES parameter (tests/test_<kernel>.py). Everything but the build guard skips without a GPU."""
import copy
import os
import shutil

import pytest
import torch
from conftest import LOGITS_ATOL, assert_parity, needs_cuda
from test_attention import attention_variant, qkv, ref_attention
from test_matmul import ref_mm

import gpt2kern
from gpt2kern import _C, ops


def _nvcc_present():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or shutil.which("nvcc"):
        return True
    return any(os.path.isfile(os.path.join(d, "bin", "nvcc")) for d in ["/usr/local/cuda"])


def _cuda_build_wanted():
    """setup.py's rule: the CUDA kernels are built when a GPU is visible or GPT2KERN_CUDA=1 / GPT2KERN_REQUIRE_CUDA=1
    asks (CI sets both), unless GPT2KERN_NO_CUDA=1 or GPT2KERN_CUDA=0."""
    if os.environ.get("GPT2KERN_NO_CUDA") == "1" or os.environ.get("GPT2KERN_CUDA") == "0":
        return False
    return (torch.cuda.is_available() or os.environ.get("GPT2KERN_CUDA") == "1"
            or os.environ.get("GPT2KERN_REQUIRE_CUDA") == "1")


@pytest.mark.skipif(torch.version.cuda is None or not _nvcc_present() or not _cuda_build_wanted(),
                    reason="CPU-only torch, no nvcc, or no GPU and GPT2KERN_CUDA unset: a CPU-only build is expected")
def test_cuda_kernels_were_built():
    # torch is a CUDA build, nvcc exists and the CUDA kernels were wanted, so setup.py must have compiled csrc/cuda:
    # a CUDA compile problem or a silently CPU-only build fails here, GPU or not.
    assert ops.has_cuda(), "gpt2kern._C was built without its CUDA kernels although torch has CUDA and nvcc exists"
    for op in ("layer_norm", "add_layer_norm", "gelu_new", "pack", "conv1d", "attention", "embedding",
               "decode_attention", "matmul_nk", "matmul_prefill", "kv_write", "matmul_decode", "embedding_step"):
        assert "CUDA: registered" in torch._C._dispatch_dump(f"gpt2kern::{op}"), op



@pytest.mark.skipif(not ops.has_cuda(), reason="built without the CUDA kernels")
def test_cuda_variant_reads_sets_and_refuses():
    # the prefill kernels' variant knobs live in the extension (no GPU needed to reach them)
    for name in ops.CUDA_VARIANTS:
        now = ops.cuda_variant(name)
        assert now >= 1
        assert ops.cuda_variant(name, now) == now
        for bad in (99, 0.5, True):
            with pytest.raises((ValueError, TypeError), match="value|variants"):
                ops.cuda_variant(name, bad)
        assert ops.cuda_variant(name) == now  # a refused value changes nothing
    # a temporary switch (the decoder's gemv 5 step) leaves the choice and whether it was the caller's as they were
    for name in ops.CUDA_VARIANTS:
        now = ops.cuda_variant(name)
        ops.forget_chosen_cuda_variant(name)
        with ops.using_cuda_variant(name, now):
            assert name in ops.chosen_cuda_variants()
        assert ops.cuda_variant(name) == now and name not in ops.chosen_cuda_variants()
    with pytest.raises(ValueError, match="name must be one of prefill_gemm, prefill_attention"):
        ops.cuda_variant("gemv")
    with pytest.raises(TypeError, match="name must be a str"):
        ops.cuda_variant(3)


def epilogue_ref(ref, terms, epilogue, res):
    """The float64 reference (and its |terms|) of a matmul after the fused epilogue."""
    from test_gelu import gelu_terms, ref_gelu
    if epilogue == "gelu_new":
        return ref_gelu(ref), 1.13 * terms + gelu_terms(ref)
    if epilogue == "residual":
        return ref + res.double(), terms + res.double().abs()
    return ref, terms


# ---------------------------------------------------------------- kernel cases only the CUDA kernels branch on

@needs_cuda
@pytest.mark.parametrize("B,H,Tq,Tkv,D,off", [
    (2, 12, 256, 256, 64, 0),   # enough rows for one warp per 8 rows (no key split)
    (1, 12, 300, 700, 64, 400),  # ragged row blocks, long prefix
    (1, 2, 40, 40, 128, 0),     # widest head dim (4 floats per lane, > 48 KiB shared memory)
    (3, 5, 9, 70, 20, 61),      # head dim not a multiple of 32
    (32, 12, 1, 513, 64, 512),  # decode B=32
    (1, 12, 1, 1024, 64, 1023),  # decode, keys split over 4 warps
])
def test_attention_cuda_paths(B, H, Tq, Tkv, D, off):
    q, k, v = qkv(B, H, Tq, Tkv, D, 5)
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), None, None, D ** -0.5, off, True)
    assert_parity(out, *ref_attention(q, k, v, scale=D ** -0.5, q_offset=off), max(Tkv, D), "cuda attention")


@needs_cuda
def test_attention_cuda_mask_and_bias_together():
    B, H, Tq, Tkv, D = 2, 3, 5, 45, 64
    q, k, v = qkv(B, H, Tq, Tkv, D, 6)
    mask = torch.ones(B, 50, dtype=torch.bool)  # longer than Tkv: extra entries ignored
    mask[0, :7] = False
    mask[1, 30:] = False
    bias = torch.randn(1, H, Tq, 40)  # shorter than Tkv: keys past it unseen
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), mask.cuda(), bias.cuda(), 0.125, 40, True)
    ref, terms = ref_attention(q, k, v, key_mask=mask, bias=bias, scale=0.125, q_offset=40)
    assert_parity(out, ref, terms, Tkv, "mask+bias")


@needs_cuda
@pytest.mark.parametrize("M,K,N", [(1, 3072, 768), (8, 768, 2304), (9, 768, 768), (2, 768, 50257), (4, 200, 3),
                                   (32, 3072, 768), (32, 768, 50257), (33, 768, 2304), (64, 64, 64), (65, 100, 130),
                                   (512, 768, 2304), (300, 64, 20000), (1030, 37, 4100)])
@pytest.mark.parametrize("epilogue", ["none", "gelu_new", "residual"])
def test_conv1d_cuda_paths(M, K, N, epilogue):
    # M <= 32: GEMV (8 or 32 register rows; split-K when N is narrow); else the double-buffered 128x128 GEMM, split-K
    # when its tiles leave SMs idle; ragged edges of every tiling
    torch.manual_seed(M + N)
    x, w, b = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N)
    res = torch.randn(M, N) if epilogue == "residual" else None
    y = ops.conv1d(x.cuda(), ops.pack(w.cuda()), b.cuda(), epilogue, None if res is None else res.cuda(), N)
    ref, terms = epilogue_ref(*ref_mm(x, w, b), epilogue, res)
    assert_parity(y, ref, terms, K, f"cuda conv1d {M}x{K}x{N} {epilogue}")


@needs_cuda
def test_pack_on_cuda_is_a_contiguous_copy():
    w = torch.randn(40, 5, device="cuda").t()
    p = ops.pack(w)
    assert p.shape == (5, 40) and p.is_contiguous() and torch.equal(p, w) and p.data_ptr() != w.data_ptr()


@needs_cuda
def test_device_mismatch_is_a_value_error():
    x, w, b = torch.randn(2, 8, device="cuda"), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="weight is on cpu"):
        ops.layer_norm(x, w, b)
    with pytest.raises(ValueError, match="weight is on cpu"):
        ops.conv1d(x, torch.randn(8, 4))
    q = torch.randn(1, 2, 3, 8, device="cuda")
    with pytest.raises(ValueError, match="key_mask is on cpu"):
        ops.attention(q, q, q, torch.ones(1, 3, dtype=torch.bool), None, 1.0, 0, True)
    with pytest.raises(ValueError, match="input_ids is on cpu"):
        ops.embedding(torch.zeros(1, 3, dtype=torch.long), torch.randn(9, 8, device="cuda"),
                      torch.randn(9, 8, device="cuda"), torch.arange(3, device="cuda")[None])
    with pytest.raises(ValueError, match="on CUDA the weight must be"):
        ops.conv1d(x, torch.randn(1, 8, 32, device="cuda"), out_features=32)


@pytest.fixture(params=[2, 3], ids=["gemm2", "gemm3"])
def prefill_gemm(request):
    """Run the test under each prefill GEMM variant (ops.cuda_variant): 2 fp32 FMAs, 3 3xTF32 tensor cores."""
    before = ops.cuda_variant("prefill_gemm")
    ops.cuda_variant("prefill_gemm", request.param)
    yield request.param
    ops.cuda_variant("prefill_gemm", before)


# ---------------------------------------------------------------- the model on CUDA

@pytest.fixture(scope="module")
def cuda_pair(distil):
    ref = copy.deepcopy(distil).cuda()
    opt = gpt2kern.optimize(copy.deepcopy(distil).cuda())
    return ref, opt


@needs_cuda
@torch.no_grad()
def test_cuda_logits_match_hf_eager(distil, cuda_pair, prefill_gemm):
    _, opt = cuda_pair
    for B, T in [(1, 1), (2, 17), (1, 512), (1, distil.config.n_positions)]:
        ids = torch.randint(0, distil.config.vocab_size, (B, T))
        a = distil(ids).logits  # HF eager fp32 on CPU: the reference
        b = opt(ids.cuda()).logits
        assert gpt2kern.fallback_reason(opt) is None
        err = (a - b.cpu()).abs().max().item()
        assert err <= LOGITS_ATOL, f"B={B} T={T}: max |Δlogits| {err:.3g}"


@needs_cuda
@torch.no_grad()
def test_cuda_every_layer_matches_hf(distil, cuda_pair):
    ref, opt = cuda_pair
    ids = torch.randint(0, distil.config.vocab_size, (2, 13), device="cuda")
    rec = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: rec.__setitem__(n, o[0] if isinstance(o, tuple) else o))
             for n, m in ref.named_modules() if n]
    try:
        ref(ids)
    finally:
        for h in hooks:
            h.remove()
    with gpt2kern.tracing(opt) as ours:
        opt(ids)
    assert len(ours) == 3 + 7 * distil.config.n_layer + 1
    for name, t in ours:
        key = name if name == "lm_head" else "transformer." + name
        if key in rec:  # HF names every traced step (its `act` output is our fused c_fc+gelu)
            torch.testing.assert_close(t, rec[key], atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_cuda
@torch.no_grad()
def test_cuda_generate_matches_hf(cuda_pair):
    ref, opt = cuda_pair
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    a = ref.generate(ids, attention_mask=mask, **kw)
    b = opt.generate(ids, attention_mask=mask, **kw)
    assert gpt2kern.fallback_reason(opt) is None
    assert torch.equal(a, b)


@needs_cuda
@torch.no_grad()
def test_cuda_flash_attention_in_the_model(distil, cuda_pair):
    # prefill attention variant 2 as the model calls it: q, k, v views of c_attn's output, left padding as key_mask,
    # then generate (prefill by variant 2, decode steps by variant 1 over its cache)
    ref, opt = cuda_pair
    V = distil.config.vocab_size
    with attention_variant(2):
        for B, T, pad in [(1, 512, 0), (2, 100, 7), (1, distil.config.n_positions, 0)]:
            ids = torch.randint(0, V, (B, T))
            mask = torch.ones(B, T, dtype=torch.long)
            mask[B - 1, :pad] = 0
            a = distil(ids, attention_mask=mask).logits  # HF eager fp32 on CPU
            b = opt(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
            assert gpt2kern.fallback_reason(opt) is None
            keep = mask.bool()  # logits of padding positions are not compared
            err = (a[keep] - b[keep]).abs().max().item()
            assert err <= LOGITS_ATOL, f"B={B} T={T} pad={pad}: max |dlogits| {err:.3g}"
        ids = torch.randint(0, V, (2, 40), device="cuda")
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ref.generate(ids, attention_mask=mask, **kw), opt.generate(ids, attention_mask=mask, **kw))


# ---------------------------------------------------------------- the CUDA-graph decoder

def _until_eos(tokens, start, eos):
    rows = []
    for row in tokens.tolist():
        cut = next((i + 1 for i in range(start, len(row)) if row[i] == eos), len(row))
        rows.append(row[:cut])
    return rows


@needs_cuda
@pytest.mark.parametrize("graph", [True, False])
@torch.no_grad()
def test_cuda_graph_decoder_matches_hf_generate(cuda_pair, graph):
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    ref, _ = cuda_pair
    B, T, n = 3, 11, 40
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    dec = CudaGraphDecoder(ref, batch_size=B, max_len=T + n, use_graph=graph)
    ours = dec.generate(ids, n, attention_mask=mask)
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    eos = ref.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    a, b = _until_eos(hf, T, eos), _until_eos(ours[:, : hf.shape[1]], T, eos)
    assert a == b
    # logits of a second run, step by step, vs HF's full forward on the same tokens
    logits = dec.prefill(ids, attention_mask=mask)
    seq = ids
    for _ in range(5):
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        logits = dec.step(nxt).clone()
    full_mask = torch.cat([mask, torch.ones(B, 5, dtype=mask.dtype, device="cuda")], 1)
    pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    want = ref(seq, attention_mask=full_mask, position_ids=pos).logits[:, -1]
    assert (want - logits).abs().max().item() <= LOGITS_ATOL


def test_cuda_graph_decoder_rejects_cpu_models(tiny):
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    with pytest.raises((ValueError, RuntimeError), match="CUDA"):
        CudaGraphDecoder(tiny, batch_size=1, max_len=8)


# ---------------------------------------------------------------- the decode step's kernels and their variants

@needs_cuda
@pytest.mark.parametrize("B,H,Tq,Tmax,D,n,per_row,kpad", [
    (1, 12, 1, 1024, 64, 1, False, 0), (1, 12, 1, 1024, 64, 700, False, 0), (32, 12, 1, 300, 64, 129, True, 0),
    (3, 5, 1, 70, 20, 33, True, 0), (2, 2, 1, 96, 128, 96, False, 0), (2, 3, 1, 40, 32, 0, False, 0),
    (2, 3, 1, 40, 32, 99, False, 0),
    # flash-decoding does not apply, the general kernel runs: D % 4 != 0, several query rows, unaligned key rows
    (3, 5, 1, 70, 18, 33, True, 0), (2, 4, 3, 50, 64, 41, True, 0), (2, 4, 1, 50, 64, 41, False, 1)])
def test_decode_attention(B, H, Tq, Tmax, D, n, per_row, kpad):
    """Keys past kv_len are never read (NaN there, key_mask True): the result is attention over the first kv_len
    keys (clamped to the cache; 0 keys: zeros), per row when kv_len is [B]; padding via key_mask. Flash-decoding
    where it applies and the general kernel elsewhere give that result."""
    q, k, v = qkv(B, H, Tq, Tmax, D, 9)
    lens = [max(0, min(n - 3 * b, Tmax)) if per_row else min(n, Tmax) for b in range(B)]
    mask = torch.ones(B, Tmax, dtype=torch.bool)
    mask[-1, :2] = False  # left padding in the last row
    for b, m in enumerate(lens):
        k[b, :, m:] = float("nan")
        v[b, :, m:] = float("nan")
    kc = k.cuda()
    if kpad:  # key rows D + kpad floats apart: not 16-byte aligned
        kc = torch.zeros(B, H, Tmax, D + kpad, device="cuda")[..., :D].copy_(kc)
    kv_len = torch.tensor(lens if per_row else [n])
    out = ops.decode_attention(q.cuda(), kc, v.cuda(), mask.cuda(), kv_len.cuda(), D ** -0.5).cpu()
    for b, m in enumerate(lens):
        if m == 0:  # no key yet: zeros
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"decode_attention row {b}: kv_len 0"
            continue
        ref, terms = ref_attention(q[b:b + 1], k[b:b + 1, :, :m], v[b:b + 1, :, :m], key_mask=mask[b:b + 1],
                                   scale=D ** -0.5, causal=False)
        assert_parity(out[b:b + 1], ref, terms, max(m, D), f"decode_attention row {b}")


@needs_cuda
def test_decode_attention_argument_errors():
    q, k, v = (t.cuda() for t in qkv(2, 2, 1, 8, 8))
    with pytest.raises(TypeError, match="kv_len must be Long"):
        ops.decode_attention(q, k, v, None, torch.tensor([1.0], device="cuda"), 1.0)
    with pytest.raises(ValueError, match="kv_len must be"):
        ops.decode_attention(q, k, v, None, torch.tensor([1, 2, 3], device="cuda"), 1.0)
    with pytest.raises(ValueError, match="kv_len is on cpu"):
        ops.decode_attention(q, k, v, None, torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="head dims up to 128"):
        q2 = torch.randn(1, 1, 1, 132, device="cuda")
        ops.decode_attention(q2, q2, q2, None, torch.tensor([1], device="cuda"), 1.0)


@needs_cuda
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (1, 3072, 768), (8, 768, 50257), (9, 768, 3072),
                                   (32, 3072, 768), (5, 37, 100), (32, 130, 7)])
@pytest.mark.parametrize("epilogue", ["none", "gelu_new", "residual"])
def test_matmul_nk_variant(M, K, N, epilogue):
    # float4 path (K % 4 == 0) and scalar path; 1, 8 and 32 register rows
    torch.manual_seed(M * K + N)
    x, w, b = torch.randn(M, K), torch.randn(K, N) * 0.05, torch.randn(N)
    res = torch.randn(M, N) if epilogue == "residual" else None
    y = ops.matmul_nk(x.cuda(), w.t().contiguous().cuda(), b.cuda(), epilogue, None if res is None else res.cuda())
    ref, terms = epilogue_ref(*ref_mm(x, w, b), epilogue, res)
    assert_parity(y, ref, terms, K, f"matmul_nk {M}x{K}x{N} {epilogue}")


@needs_cuda
def test_matmul_nk_argument_errors():
    x = torch.randn(33, 8, device="cuda")
    with pytest.raises(ValueError, match="at most 32 rows"):
        ops.matmul_nk(x, torch.randn(4, 8, device="cuda"))
    with pytest.raises(ValueError, match=r"weight must be \[N, 8\]"):
        ops.matmul_nk(x[:2], torch.randn(8, 4, device="cuda"))
    with pytest.raises(ValueError, match="bias must be"):
        ops.matmul_nk(x[:2], torch.randn(4, 8, device="cuda"), torch.randn(5, device="cuda"))
    with pytest.raises(ValueError, match="residual must be given"):
        ops.matmul_nk(x[:2], torch.randn(4, 8, device="cuda"), None, "residual")
    with pytest.raises(ValueError, match="weight is on cpu"):
        ops.matmul_nk(x[:2], torch.randn(4, 8))


# decode GEMV variants 3 (x staged in shared memory) and 4, the c_attn K/V store of matmul_decode (kv_write=3)

@needs_cuda
@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (8, 3072, 768), (9, 768, 768), (17, 300, 50), (32, 768, 2304),
                                   (32, 3072, 768), (32, 768, 50257), (5, 37, 100), (32, 1030, 7), (4, 5, 1),
                                   (17, 600, 8448), (5, 1100, 8448)])
@pytest.mark.parametrize("epilogue", ["none", "gelu_new", "residual"])
def test_matmul_decode_variants(M, K, N, epilogue):
    """Variant 3 is conv1d's GEMV with x moved to shared memory and the same summation order: bitwise equal to it,
    and so is variant 4, and within the float64 budget; 8 and 32 register rows, blocks over several x tiles
    (N = 8448: one split on <= 132 SMs, so K = 600 is 3 tiles of 256 at 32 rows, K = 1100 2 tiles of 1024 at 8),
    ragged tiles, K smaller than the warps, split and unsplit K, x rows not 16-byte aligned, an outlier channel."""
    torch.manual_seed(M * K + N)
    xc = torch.randn(M, K + 3, device="cuda")[:, 1:K + 1]  # rows lda = K + 3 apart, not 16-byte aligned
    xc[:, 0] = 3000.0  # trained GPT-2's residual outlier
    x, w, b = xc.cpu(), torch.randn(K, N) * 0.05, torch.randn(N)
    res = torch.randn(M, N) if epilogue == "residual" else None
    wc, bc, rc = w.cuda(), b.cuda(), None if res is None else res.cuda()
    y1 = ops.conv1d(xc, wc, bc, epilogue, rc)
    y3 = ops.matmul_decode(xc, wc, bc, epilogue, rc)
    assert torch.equal(y3, y1), f"variant 3 differs from conv1d by {(y3 - y1).abs().max().item():.3g}"
    counters = torch.zeros((N + 31) // 32 + 5, dtype=torch.int32, device="cuda")
    for _ in range(2):  # the counters come back to zero: a second call (a graph replay) sums the same way
        y4 = ops.matmul_decode(xc, wc, bc, epilogue, rc, counters=counters)
        assert torch.equal(y4, y1), f"variant 4 differs from conv1d by {(y4 - y1).abs().max().item():.3g}"
        assert not counters.any()
    ref, terms = epilogue_ref(*ref_mm(x, w, b), epilogue, res)
    assert_parity(y3, ref, terms, K, f"matmul_decode v3 {M}x{K}x{N} {epilogue}")


def _kv_case(B, H, Tmax, D, K, mode, seed):
    """x [B, 1, K], c_attn-shaped weight [K, 3E] in `mode` (its Linear), and one layer's caches (a slice of the
    decoder-style [layers, B, H, Tmax, D] cache)."""
    from gpt2kern.kernels.weights import Linear
    torch.manual_seed(seed)
    E = H * D
    lin = Linear.of((torch.randn(K, 3 * E) * 0.1).cuda(), torch.randn(3 * E).cuda(), mode)
    kc, vc = torch.randn(2, B, H, Tmax, D, device="cuda").unbind(0)
    return torch.randn(B, 1, K, device="cuda"), lin, kc, vc


@needs_cuda
@pytest.mark.parametrize("mode,variant", [pytest.param("fp32", 3, id="fp32-3"), pytest.param("fp32", 4, id="fp32-4"),
                                          pytest.param("fp16", None, id="fp16"), pytest.param("bf16", None, id="bf16"),
                                          pytest.param("int8", None, id="int8")])
@pytest.mark.parametrize("B,H,Tmax,D,K,slot", [(1, 12, 40, 64, 80, 0), (3, 4, 9, 8, 384, 8), (2, 2, 5, 3, 392, 2),
                                               (32, 12, 6, 64, 80, 5), (32, 12, 6, 64, 768, 3)])
def test_matmul_decode_stores_kv_as_kv_write(mode, variant, B, H, Tmax, D, K, slot):
    """With the caches, matmul_decode returns conv1d's qkv and leaves the caches as kv_write (= two index_copy_)
    would, in every weight mode (fp32: variant 3, or 4 with counters; the reduced modes: their one GEMV): through the
    GEMV's own epilogue (K = 80: one split) and through its split-K finish kernel or variant 4's in-kernel sum
    (K >= 384: 2 or more splits in every mode where N leaves SMs idle: all but E = 768 on a GPU with fewer than 36
    SMs); a slot outside [0, Tmax) stores nothing."""
    x, lin, kc, vc = _kv_case(B, H, Tmax, D, K, mode, slot)
    want = ops.conv1d(x, lin.data, lin.bias, "none", None, -1, "kn", lin.scales)
    want_k, want_v = kc.clone(), vc.clone()
    idx = torch.tensor([slot], device="cuda")
    ops.kv_write(want, want_k, want_v, idx)
    counters = torch.zeros(lin.n_out, dtype=torch.int32, device="cuda") if variant == 4 else None
    y = ops.matmul_decode(x, lin.data, lin.bias, scales=lin.scales, k_cache=kc, v_cache=vc, slot=idx,
                          counters=counters)
    assert torch.equal(y, want)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    before_k, before_v = kc.clone(), vc.clone()
    for bad in (Tmax, -1):
        ops.matmul_decode(x, lin.data, lin.bias, scales=lin.scales, k_cache=kc, v_cache=vc,
                          slot=torch.tensor([bad], device="cuda"), counters=counters)
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


@needs_cuda
def test_matmul_decode_argument_errors():
    x, w = torch.randn(2, 8, device="cuda"), torch.randn(8, 12, device="cuda")
    c, s = torch.zeros(2, 2, 5, 2, device="cuda"), torch.tensor([0], device="cuda")
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="counters go with float32 weights .*Half weights have one GEMV"):
        ops.matmul_decode(x, w.half(), counters=cnt)
    with pytest.raises(ValueError, match="at least 2 zeros"):
        ops.matmul_decode(x, torch.randn(8, 33, device="cuda"), counters=cnt)
    with pytest.raises(TypeError, match="counters must be"):
        ops.matmul_decode(x, w, counters=cnt.long())
    with pytest.raises(ValueError, match="counters is on cpu"):
        ops.matmul_decode(x, w, counters=cnt.cpu())
    with pytest.raises(ValueError, match="at most 32 rows"):
        ops.matmul_decode(torch.randn(33, 8, device="cuda"), w)
    with pytest.raises(TypeError, match="weight must be Float"):  # neither float32 nor a reduced mode
        ops.matmul_decode(x, w.double())
    with pytest.raises(ValueError, match="go together"):
        ops.matmul_decode(x, w, k_cache=c, slot=s)
    with pytest.raises(ValueError, match="one row per cache row"):
        ops.matmul_decode(x[:1], w, k_cache=c, v_cache=c.clone(), slot=s)
    with pytest.raises(ValueError, match=r"weight must be \[8, 12\] \(q, k, v columns\)"):
        ops.matmul_decode(x, w[:, :9], k_cache=c, v_cache=c.clone(), slot=s)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        ops.matmul_decode(x, w, k_cache=c, v_cache=c[:, :, :4], slot=s)
    with pytest.raises(TypeError, match="slot must be"):
        ops.matmul_decode(x, w, k_cache=c, v_cache=c.clone(), slot=s.int())
    with pytest.raises(ValueError, match="slot is on cpu"):
        ops.matmul_decode(x, w, k_cache=c, v_cache=c.clone(), slot=s.cpu())
    with pytest.raises(ValueError, match="non-empty last dim"):
        ops.matmul_decode(torch.randn(2, 0, device="cuda"), w[:0])


@needs_cuda
def test_embedding_step_advances_the_cursor():
    torch.manual_seed(0)
    V, P, n = 50, 20, 16
    wte, wpe = torch.randn(V, n, device="cuda"), torch.randn(P, n, device="cuda")
    ids = torch.tensor([[4], [49], [0]], device="cuda")  # B = 3 rows
    cursor = torch.tensor([6, 7, 6, 2, 0], device="cuda")  # slot, kv_len, the rows' last positions
    h = ops.embedding_step(ids, wte, wpe, cursor)
    assert torch.equal(cursor, torch.tensor([7, 8, 7, 3, 1], device="cuda"))
    assert torch.equal(h, ops.embedding(ids, wte, wpe, cursor[2:, None]))  # the new positions
    # a position past the table: NaN row, IndexError on the next check; the other rows are still right
    cursor = torch.tensor([0, 1, 3, P - 1, 4], device="cuda")
    h = ops.embedding_step(ids, wte, wpe, cursor)
    assert h[1].isnan().all() and h[0].isfinite().all() and h[2].isfinite().all()
    with pytest.raises(IndexError, match="position_ids contains 20"):
        ops.check_cuda_errors()
    with pytest.raises(ValueError, match=r"input_ids must be \[B, 1\]"):
        ops.embedding_step(ids.view(1, 3), wte, wpe, cursor[:3])
    with pytest.raises(ValueError, match=r"cursor must be a contiguous int64 \[2 \+ B\] = \[5\]"):
        ops.embedding_step(ids, wte, wpe, cursor[:4])
    with pytest.raises(TypeError, match="cursor must be"):
        ops.embedding_step(ids, wte, wpe, cursor.int())
    with pytest.raises(ValueError, match="cursor is on cpu"):
        ops.embedding_step(ids, wte, wpe, cursor.cpu())


@needs_cuda
def test_decode_op_opcheck():
    x, lin, kc, vc = _kv_case(2, 2, 5, 4, 384, "fp32", 1)  # K = 384: split K (variant 4's own sum)
    s = torch.tensor([1], device="cuda")
    torch.library.opcheck(torch.ops.gpt2kern.matmul_decode, (x, lin.data, lin.bias, "none", None, None))
    torch.library.opcheck(torch.ops.gpt2kern.matmul_decode,
                          (x, lin.data, lin.bias, "gelu_new", None, None, None, None, None,
                           torch.zeros(2, dtype=torch.int32, device="cuda")))
    torch.library.opcheck(torch.ops.gpt2kern.matmul_decode, (x, lin.data, lin.bias, "none", None, None, kc, vc, s))
    x8, lin8, kc8, vc8 = _kv_case(2, 2, 5, 4, 384, "int8", 1)
    torch.library.opcheck(torch.ops.gpt2kern.matmul_decode,
                          (x8, lin8.data, lin8.bias, "none", None, lin8.scales, kc8, vc8, s))
    wte, wpe = torch.randn(9, 4, device="cuda"), torch.randn(7, 4, device="cuda")
    torch.library.opcheck(torch.ops.gpt2kern.embedding_step,
                          (torch.tensor([[1], [2]], device="cuda"), wte, wpe, torch.zeros(4, dtype=torch.long,
                                                                                         device="cuda")))


# distilgpt2's prefill GEMMs (c_attn, attn c_proj, c_fc, mlp c_proj) and its lm_head, at prompt lengths 128…1024
PREFILL_BLOCK_KN = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
PREFILL_SHAPES = ([(M, K, N) for M in (128, 512, 1024) for K, N in PREFILL_BLOCK_KN]
                  + [(128, 768, 50257), (512, 768, 50257)])


def _prefill_ref(M, K, N, epilogue):
    torch.manual_seed(M * 31 + K * 7 + N)
    x, w, b = torch.randn(M, K).cuda(), (torch.randn(K, N) * 0.05).cuda(), torch.randn(N).cuda()
    res = torch.randn(M, N).cuda() if epilogue == "residual" else None
    # float64 on the GPU: the lm_head's at M = 512 would take seconds on the CPU
    ref, terms = epilogue_ref(*ref_mm(x, w, b), epilogue, res)
    return x, w, b, res, ref, terms


@needs_cuda
@pytest.mark.parametrize("M,K,N,epilogue", [(M, K, N, e) for M, K, N in PREFILL_SHAPES
                                            for e in (("none",) if N == 50257 else ("none", "gelu_new", "residual"))])
def test_matmul_prefill(M, K, N, epilogue, prefill_gemm):
    # K split at the block shapes (fewer 128x128 tiles than SMs) and not at the lm_head's (which has no epilogue in
    # the model); conv1d's prefill is this GEMM with this split count: bitwise the same
    x, w, b, res, ref, terms = _prefill_ref(M, K, N, epilogue)
    y = ops.matmul_prefill(x, w, b, epilogue, res)
    assert_parity(y, ref, terms, K, f"matmul_prefill {M}x{K}x{N} {epilogue}")
    assert torch.equal(y, ops.conv1d(x, w, b, epilogue, res))


@needs_cuda
@pytest.mark.parametrize("M,K,N,splits", [(128, 768, 768, 1), (128, 768, 768, 3), (128, 768, 768, 7),
                                          (200, 37, 100, 1), (200, 37, 100, 4), (129, 40, 260, 8),
                                          (33, 3072, 130, 16), (1, 16, 4, 2)])
@pytest.mark.parametrize("epilogue", ["none", "gelu_new", "residual"])
def test_matmul_prefill_forced_splits(M, K, N, splits, epilogue, prefill_gemm):
    # forced split counts: none, non-dividing, more splits than K tiles (empty splits write zeros: K=40 is 5 tiles
    # of 8 for 8 splits), odd M / K / N (the scalar load path: K % 4 != 0 or N % 4 != 0), strided x
    x, w, b, res, ref, terms = _prefill_ref(M, K, N, epilogue)
    xs = torch.zeros(M, K + 3, device="cuda")
    xs[:, :K] = x
    xc = xs[:, :K]  # row stride K + 3: unaligned rows, the scalar path
    y = ops.matmul_prefill(xc, w, b, epilogue, res, splits)
    assert_parity(y, ref, terms, K, f"matmul_prefill {M}x{K}x{N} splits={splits} {epilogue}")
    y2 = ops.matmul_prefill(x, w, b, epilogue, res, splits)
    assert_parity(y2, ref, terms, K, f"matmul_prefill contiguous {M}x{K}x{N} splits={splits} {epilogue}")
    # deterministic: the partials are summed in split order, so a second run is bitwise the same
    assert torch.equal(y2, ops.matmul_prefill(x, w, b, epilogue, res, splits))


@needs_cuda
def test_prefill_gemm_3_is_another_kernel_and_falls_back_to_2():
    # variant 3's products run on tensor cores in another order: not bitwise variant 2 (yet both within the ulp
    # budget, test_matmul_prefill); where it cannot run (K % 4 != 0, unaligned rows) variant 2 runs, bitwise
    before = ops.cuda_variant("prefill_gemm")
    try:
        for M, K, N, epilogue, must_differ in ((256, 768, 2304, "gelu_new", True), (200, 37, 100, "none", False),
                                               (130, 768, 770, "none", False)):
            x, w, b, res, ref, terms = _prefill_ref(M, K, N, epilogue)
            ops.cuda_variant("prefill_gemm", 2)
            y2 = ops.matmul_prefill(x, w, b, epilogue, res)
            ops.cuda_variant("prefill_gemm", 3)
            y3 = ops.matmul_prefill(x, w, b, epilogue, res)
            assert_parity(y3, ref, terms, K, f"gemm3 {M}x{K}x{N}")
            assert torch.equal(y2, y3) != must_differ, (M, K, N)
        ops.cuda_variant("prefill_gemm", 3)
        x, w, b, res, ref, terms = _prefill_ref(256, 768, 768, "residual")
        # deterministic like variant 2: the same call twice is bitwise the same, split-K or not
        for splits in (0, 1, 5):
            y = ops.matmul_prefill(x, w, b, "residual", res, splits)
            assert_parity(y, ref, terms, 768, f"gemm3 splits={splits}")
            assert torch.equal(y, ops.matmul_prefill(x, w, b, "residual", res, splits))
    finally:
        ops.cuda_variant("prefill_gemm", before)


@needs_cuda
def test_prefill_gemm_3_keeps_infinities():
    # an infinite x has no TF32 remainder: big carries it (inf - inf would have made the row NaN); as variant 2
    x, w = torch.randn(130, 64, device="cuda"), torch.randn(64, 64, device="cuda").abs()
    x[3, 5] = float("inf")
    x[7, 9] = float("-inf")
    before = ops.cuda_variant("prefill_gemm")
    try:
        out = {}
        for v in (2, 3):
            ops.cuda_variant("prefill_gemm", v)
            out[v] = ops.matmul_prefill(x, w)
    finally:
        ops.cuda_variant("prefill_gemm", before)
    assert (out[3][3] == float("inf")).all() and (out[3][7] == float("-inf")).all()
    assert torch.equal(out[3].isfinite(), out[2].isfinite()) and out[3].isfinite().sum() == 128 * 64


@needs_cuda
def test_matmul_prefill_argument_errors():
    x, w = torch.randn(130, 8, device="cuda"), torch.randn(8, 4, device="cuda")
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="splits must be 0"):
            ops.matmul_prefill(x, w, splits=bad)
    with pytest.raises(ValueError, match=r"weight must be \[8, out\]"):
        ops.matmul_prefill(x, torch.randn(4, 8, device="cuda"))
    with pytest.raises(ValueError, match="residual"):
        ops.matmul_prefill(x, w, None, "residual")
    with pytest.raises(ValueError, match="bias"):
        ops.matmul_prefill(x, w, torch.randn(5, device="cuda"))
    with pytest.raises(TypeError, match="weight must be Float"):
        ops.matmul_prefill(x, w.half())


def test_decode_variant_ops_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.matmul_nk(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.matmul_prefill(torch.randn(130, 8), torch.randn(8, 4))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.kv_write(torch.randn(1, 24), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        q = torch.randn(1, 1, 1, 8)
        ops.decode_attention(q, q, q, None, torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.matmul_decode(torch.randn(1, 8), torch.randn(8, 4))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.embedding_step(torch.zeros(1, 1, dtype=torch.long), torch.randn(5, 4), torch.randn(3, 4),
                           torch.zeros(3, dtype=torch.long))


def test_decode_variant_ops_fakes():
    """The fake (meta) implementations of the CUDA-only decode ops give the CUDA ops' shapes (torch.compile, meta)."""
    m = dict(device="meta")
    y = torch.ops.gpt2kern.matmul_decode(torch.empty(3, 1, 8, **m), torch.empty(8, 24, **m), None, "none", None, None,
                                         torch.empty(3, 2, 5, 4, **m), torch.empty(3, 2, 5, 4, **m),
                                         torch.empty(1, dtype=torch.long, **m))
    assert y.shape == (3, 1, 24) and y.device.type == "meta"
    h = torch.ops.gpt2kern.embedding_step(torch.empty(3, 1, dtype=torch.long, **m), torch.empty(50, 16, **m),
                                          torch.empty(20, 16, **m), torch.empty(5, dtype=torch.long, **m))
    assert h.shape == (3, 1, 16) and h.dtype == torch.float32


@needs_cuda
@pytest.mark.parametrize("gemv,kv_write", [(2, 2), (3, 2), (4, 2), (3, 3), (4, 3), (5, 2)])
@torch.no_grad()
def test_cuda_graph_decoder_variants_match_hf(cuda_pair, gemv, kv_write):
    """Every variant pair: HF's greedy tokens; the step never reads cache slots past the tokens so far (they hold
    NaN here, and key_mask does not hide them: only kv_len does); the graph's launches are counted."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    ref, _ = cuda_pair
    B, T, n = 2, 7, 20
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    dec = CudaGraphDecoder(ref, batch_size=B, max_len=T + n + 30, gemv=gemv, kv_write=kv_write)
    c = dec.launches_per_token
    assert c["kernel"] > 0 and c["total"] == c["kernel"] + c["memcpy"] + c["memset"] + c["other"]
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    eos = ref.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    assert _until_eos(hf, T, eos) == _until_eos(dec.generate(ids, n, attention_mask=mask)[:, : hf.shape[1]], T, eos)
    logits = dec.prefill(ids, attention_mask=mask)
    dec.k_cache[:, :, :, T + 1:] = float("nan")
    dec.v_cache[:, :, :, T + 1:] = float("nan")
    seq = ids
    for _ in range(3):
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        logits = dec.step(nxt).clone()
    assert logits.isfinite().all()
    full_mask = torch.cat([mask, torch.ones(B, 3, dtype=mask.dtype, device="cuda")], 1)
    pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    want = ref(seq, attention_mask=full_mask, position_ids=pos).logits[:, -1]
    assert (want - logits).abs().max().item() <= LOGITS_ATOL


@needs_cuda
@pytest.mark.parametrize("B,H,Tmax,D,slot", [(1, 12, 40, 64, 0), (3, 4, 9, 8, 8), (2, 2, 5, 3, 2)])
def test_kv_write_matches_index_copy(B, H, Tmax, D, slot):
    torch.manual_seed(B * H + slot)
    E = H * D
    qkv = torch.randn(B, 1, 3 * E, device="cuda")
    kc, vc = torch.randn(2, B, H, Tmax, D, device="cuda").unbind(0)  # strided views, as the decoder's layer caches
    want_k, want_v = kc.clone(), vc.clone()
    _, k, v = (s.view(B, 1, H, D).transpose(1, 2) for s in qkv.split(E, dim=2))
    idx = torch.tensor([slot], device="cuda")
    want_k.index_copy_(2, idx, k)
    want_v.index_copy_(2, idx, v)
    ops.kv_write(qkv, kc, vc, idx)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # a slot outside [0, Tmax) writes nothing
    before_k, before_v = kc.clone(), vc.clone()
    for bad in (Tmax, -1):
        ops.kv_write(qkv.view(B, 3 * E), kc, vc, torch.tensor([bad], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


@needs_cuda
def test_kv_write_argument_errors():
    qkv, c = torch.randn(2, 1, 24, device="cuda"), torch.zeros(2, 2, 5, 4, device="cuda")
    s = torch.tensor([0], device="cuda")
    with pytest.raises(ValueError, match=r"qkv must be \[2, 24\]"):
        ops.kv_write(qkv[:, :, :12], c, c.clone(), s)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        ops.kv_write(qkv, c, c[:, :, :4], s)
    with pytest.raises(TypeError, match="slot must be"):
        ops.kv_write(qkv, c, c.clone(), s.int())
    with pytest.raises(ValueError, match="slot is on cpu"):
        ops.kv_write(qkv, c, c.clone(), s.cpu())


@needs_cuda
@pytest.mark.parametrize("gemv,graph", [(3, True), (3, False), (4, True)])
@torch.no_grad()
def test_cuda_graph_decoder_kv_write_3_matches_kv_write_2_and_hf(cuda_pair, gemv, graph):
    """kv_write=3 (K/V stored by c_attn's GEMV, the cursor advanced by the embedding kernel): the same tokens, caches
    and cursor as kv_write=2 (one K/V kernel per layer) and HF generate's tokens, and fewer launches."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    ref, _ = cuda_pair
    B, T, n = 2, 7, 20
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(batch_size=B, max_len=T + n + 5, gemv=gemv, use_graph=graph)
    fused, unfused = CudaGraphDecoder(ref, kv_write=3, **kw), CudaGraphDecoder(ref, kv_write=2, **kw)
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    eos = ref.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    a = fused.generate(ids, n, attention_mask=mask)
    assert torch.equal(a, unfused.generate(ids, n, attention_mask=mask))
    assert _until_eos(hf, T, eos) == _until_eos(a[:, : hf.shape[1]], T, eos)
    assert torch.equal(fused.k_cache, unfused.k_cache) and torch.equal(fused.v_cache, unfused.v_cache)
    assert torch.equal(fused.cursor, unfused.cursor)
    if graph:  # no K/V kernel per layer, no cursor add
        fewer = len(fused.W.layers) + 1
        assert fused.launches_per_token["total"] <= unfused.launches_per_token["total"] - fewer, (
            fused.launches_per_token, unfused.launches_per_token)


def _needs_sm90():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs an sm_90 GPU")


@needs_cuda
@pytest.mark.parametrize("gemv,kv_write,B,graph", [(2, 2, 1, True), (2, 2, 1, False), (3, 3, 2, True),
                                                   (4, 3, 2, True), (4, 2, 3, True), (None, 2, 33, True)])
@torch.no_grad()
def test_cuda_graph_decoder_launch_2_is_bitwise_launch_1(cuda_pair, gemv, kv_write, B, graph):
    """launch=2 (programmatic dependent launch: each kernel may start while the previous runs and waits on the
    device for its inputs) computes exactly what launch=1 does: the same tokens, logits, caches and cursor, bitwise,
    with and without the graph, and the same kernels in the graph; and it leaves the process setting as it was."""
    _needs_sm90()
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    ref, _ = cuda_pair
    T, n = 7, 12
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0
    kw = dict(batch_size=B, max_len=T + n + 5, gemv=gemv, kv_write=kv_write, use_graph=graph)
    before = ops.set_cuda_pdl(False)
    try:
        pdl, plain = CudaGraphDecoder(ref, launch=2, **kw), CudaGraphDecoder(ref, launch=1, **kw)
        assert ops.set_cuda_pdl(False) is False  # the decoder turned it off again after its capture
        assert pdl.variants["launch"] == 2
        a = pdl.generate(ids, n, attention_mask=mask)
        assert torch.equal(a, plain.generate(ids, n, attention_mask=mask))
        assert torch.equal(pdl.k_cache, plain.k_cache) and torch.equal(pdl.v_cache, plain.v_cache)
        assert torch.equal(pdl.cursor, plain.cursor)
        la, lb = pdl.prefill(ids, attention_mask=mask), plain.prefill(ids, attention_mask=mask)
        for _ in range(4):
            nxt = la.argmax(-1)
            la, lb = pdl.step(nxt).clone(), plain.step(nxt).clone()
            assert torch.equal(la, lb)
        if graph:
            assert pdl.launches_per_token == plain.launches_per_token
        hf = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        eos = ref.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        assert _until_eos(hf, T, eos) == _until_eos(a[:, : hf.shape[1]], T, eos)
    finally:
        ops.set_cuda_pdl(before)


@needs_cuda
@torch.no_grad()
def test_pdl_launches_of_dependent_kernels_are_bitwise_plain_launches():
    """Every kernel family launched with programmatic dependent launch on a side stream, each reading the previous
    one's output (a kernel that touched its inputs before waiting would read stale data), in a loop long enough to
    overlap: bitwise the plain launches' results."""
    _needs_sm90()
    torch.manual_seed(0)
    B, T, H, D = 2, 40, 2, 32  # D 32: prefill attention variant 2 applies
    E = H * D
    w_ln, b_ln = torch.randn(E, device="cuda"), torch.randn(E, device="cuda")
    w_qkv, b_qkv = torch.randn(E, 3 * E, device="cuda") * 0.1, torch.randn(3 * E, device="cuda")
    w_nk = torch.randn(E, E, device="cuda") * 0.1
    wte, wpe = torch.randn(100, E, device="cuda"), torch.randn(T + 1, E, device="cuda")
    ids = torch.randint(0, 100, (B, T), device="cuda")
    pos = torch.arange(T, device="cuda")[None].expand(B, T)

    from gpt2kern.kernels.weights import WeightFormat, int8_group
    low = {}  # bf16 and int8 [N, K] copies for the reduced modes' decode GEMV, a bf16 [K, N] for its prefill GEMM
    for mode in ("bf16", "int8"):
        fmt = WeightFormat("kn", mode, E, 3 * E, int8_group(E) if mode == "int8" else 0)
        low[mode] = fmt.nk_copy(*fmt.make(w_qkv))[1:]
    w16, _ = WeightFormat("kn", "bf16", E, 3 * E, 0).make(w_qkv)

    def chain():
        h = ops.embedding(ids, wte, wpe, pos)
        out = []
        for _ in range(6):
            x = ops.layer_norm(h, w_ln, b_ln, 1e-5)
            qkv = ops.conv1d(x, w_qkv, b_qkv, "gelu_new")  # the prefill GEMM (80 rows)
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(E, dim=2))
            a = ops.attention(q, k, v, None, None, D ** -0.5, 0, True).reshape(B, T, E)
            r = ops.matmul_nk(a[:, -1], w_nk, None, "residual", h[:, -1])  # the decode GEMV, residual epilogue
            d = ops.matmul_decode(r, w_qkv, b_qkv)  # the staged decode GEMV
            lw = [ops.matmul_nk(r, dd, b_qkv, scales=ss) for dd, ss in low.values()]  # reduced modes' [N, K] GEMV
            p16 = ops.conv1d(x, w16, b_qkv)  # bf16 weights at 80 rows: the mode's prefill GEMM
            h, x = ops.add_layer_norm(a, h, w_ln, b_ln, 1e-5)
            h = ops.gelu_new(h)
            out += [r, d, x, p16, *lw]
        return out

    before = (ops.set_cuda_pdl(False), ops.cuda_variant("prefill_gemm"), ops.cuda_variant("prefill_attention"))
    try:
        for gemm, attn in ((2, 1), (3, 2)):  # every prefill kernel variant too
            ops.cuda_variant("prefill_gemm", gemm)
            ops.cuda_variant("prefill_attention", attn)
            want = chain()
            side = torch.cuda.Stream()  # PDL applies on a created stream (the default stream keeps plain launches)
            side.wait_stream(torch.cuda.current_stream())
            for _ in range(3):
                with ops.cuda_pdl(True), torch.cuda.stream(side):
                    got = chain()
                torch.cuda.synchronize()
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (gemm, attn)
    finally:
        ops.set_cuda_pdl(before[0])
        ops.cuda_variant("prefill_gemm", before[1])
        ops.cuda_variant("prefill_attention", before[2])


@needs_cuda
def test_set_cuda_pdl_refuses_before_sm90_and_takes_bools():
    with pytest.raises(TypeError, match="on must be a bool"):
        ops.set_cuda_pdl(1)
    if torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ValueError, match="needs an sm_90"):
            ops.set_cuda_pdl(True)
    else:
        before = ops.set_cuda_pdl(True)
        assert ops.set_cuda_pdl(before) is True


@needs_cuda
@torch.no_grad()
def test_cuda_graph_decoder_takes_its_defaults_from_the_variant_table(cuda_pair, tmp_path, monkeypatch):
    """Variants not given come from gpt2kern/decode/cuda_variants.json's entry for this GPU (gpu_bench writes it); given
    ones win; the same tokens as HF whichever were picked."""
    import json

    from gpt2kern.decode import cuda_graph
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    ref, _ = cuda_pair
    table = dict(gpus={torch.cuda.get_device_name(): dict(by_batch={"1": dict(gemv=4, kv_write=3)})})
    path = tmp_path / "cuda_variants.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(cuda_graph, "TABLE", str(path))
    B, T, n = 2, 7, 12
    dec = CudaGraphDecoder(ref, batch_size=B, max_len=T + n)
    assert dec.variants == dict(gemv=4, kv_write=3)
    assert CudaGraphDecoder(ref, batch_size=B, max_len=T + n, gemv=3).variants == dict(gemv=3, kv_write=3)
    ids = torch.randint(0, ref.config.vocab_size, (B, T), device="cuda")
    hf = ref.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    eos = ref.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    assert _until_eos(hf, T, eos) == _until_eos(dec.generate(ids, n)[:, : hf.shape[1]], T, eos)


@needs_cuda
def test_cuda_graph_decoder_rejects_unknown_variants(cuda_pair):
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    with pytest.raises(ValueError, match="kv_write must be one of"):
        CudaGraphDecoder(cuda_pair[0], batch_size=1, max_len=8, kv_write=4)
    for bad in (0, 1):  # gemv=1 (conv1d's GEMV) is no choice: the decoder runs it only where 2-4 cannot run
        with pytest.raises(ValueError, match="gemv must be one of"):
            CudaGraphDecoder(cuda_pair[0], batch_size=1, max_len=8, gemv=bad)
    with pytest.raises(ValueError, match="kv_write must be one of"):  # the index_copy_ writes are no choice
        CudaGraphDecoder(cuda_pair[0], batch_size=1, max_len=8, kv_write=1)
    with pytest.raises(ValueError, match="gemv=2 takes kv_write=2"):
        CudaGraphDecoder(cuda_pair[0], batch_size=1, max_len=8, gemv=2, kv_write=3)
    for kw, what in ((dict(gemv=2), "gemv=2"), (dict(gemv=3), "gemv=3"), (dict(gemv=4), "gemv=4"),
                     (dict(kv_write=3), "kv_write=3"), (dict(gemv=3, kv_write=3), "gemv=3 .*; kv_write=3")):
        with pytest.raises(ValueError, match=f"{what} takes batch_size <= 32"):
            CudaGraphDecoder(cuda_pair[0], batch_size=33, max_len=8, use_graph=False, **kw)
    # chosen, not given: over 32 rows conv1d's path (the prefill GEMM) and one K/V write kernel per layer
    assert CudaGraphDecoder(cuda_pair[0], batch_size=33, max_len=8, use_graph=False).variants == dict(gemv=None,
                                                                                                    kv_write=2)


@pytest.mark.skipif(not (ops.has_cuda() and torch.cuda.is_available() and torch.cuda.device_count() >= 2),
                    reason="needs 2 GPUs (a model off the current device)")
@torch.no_grad()
def test_cuda_graph_decoder_on_a_device_that_is_not_current(distil):
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    ref = copy.deepcopy(distil).to("cuda:1")
    ids = torch.randint(0, distil.config.vocab_size, (1, 5), device="cuda:1")
    with torch.cuda.device(0):  # capture and replay must still happen on cuda:1
        dec = CudaGraphDecoder(ref, batch_size=1, max_len=20)
        assert dec.launches_per_token["kernel"] > 0
        ours = dec.generate(ids, 10)
    hf = ref.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours[:, : hf.shape[1]], hf)


# ---------------------------------------------------------------- reduced weight modes on CUDA

LOWP = ["fp16", "bf16", "int8"]


@pytest.fixture(scope="module", params=LOWP)
def cuda_mode_pair(request, distil):
    """(mode, the CPU model optimized in that mode, the CUDA model optimized in that mode)."""
    mode = request.param
    cpu = gpt2kern.optimize(copy.deepcopy(distil), weights=mode)
    gpu = gpt2kern.optimize(copy.deepcopy(distil).cuda(), weights=mode)
    return mode, cpu, gpu


@needs_cuda
@torch.no_grad()
def test_cuda_weight_modes_store_the_mode(cuda_pair, cuda_mode_pair):
    from gpt2kern.kernels.weights import _DTYPES
    from gpt2kern.model.dropin import state_of
    mode, _, gpu = cuda_mode_pair
    W = state_of(gpu).weights
    assert W.mode == mode
    for lin in [W.lm_head] + [x for L in W.layers for x in (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)]:
        assert lin.fmt.layout == "kn" and lin.data.is_cuda and lin.data.dtype == _DTYPES[mode]
        assert (lin.scales is not None) == (mode == "int8") and (lin.scales is None or lin.scales.is_cuda)
    fp32 = state_of(cuda_pair[1]).weights.nbytes
    assert W.nbytes <= fp32 * (0.5 if mode != "int8" else 0.27)


@needs_cuda
@torch.no_grad()
def test_cuda_weight_modes_error_within_tolerance(distil, cuda_mode_pair, prefill_gemm):
    """The mode's error vs HF fp32 within accuracy.TOLERANCE (T=512 teacher-forced), and the CUDA kernels' logits
    equal the CPU kernels' over the same stored weights (the quantizer is the same on both) to LOGITS_ATOL — under
    both prefill GEMM variants (3: bf16 weights on tensor cores)."""
    from gpt2kern.cli import accuracy
    mode, cpu, gpu = cuda_mode_pair
    ids = torch.randint(0, distil.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    want = distil(ids).logits
    got = gpu(ids.cuda()).logits
    assert gpt2kern.fallback_reason(gpu) is None
    res = dict(mode=mode, **accuracy.logit_error(want, got.cpu()))
    bad = [(k, v, lim) for k, v, lim, ok in accuracy.within(res) if not ok]
    assert not bad, f"{mode} on CUDA: {bad}"
    # the CPU's prefill on VDPBF16PS (an AVX512_BF16 host) rounds x to bf16, which CUDA does not: compare fp32 x
    _C.set_bf16_dot(False)
    try:
        err = (cpu(ids).logits - got.cpu()).abs().max().item()
        assert err <= LOGITS_ATOL, f"{mode}: CUDA vs CPU kernels on the same stored weights: max |dlogits| {err:.3g}"
        for B, T in [(1, 1), (3, 17)]:  # decode (GEMV) and short prefill rows
            x = torch.randint(0, distil.config.vocab_size, (B, T))
            err = (cpu(x).logits - gpu(x.cuda()).logits.cpu()).abs().max().item()
            assert err <= LOGITS_ATOL, f"{mode} B={B} T={T}: max |dlogits| {err:.3g}"
    finally:
        _C.set_bf16_dot(True)


@needs_cuda
@pytest.mark.parametrize("graph", [True, False])
@torch.no_grad()
def test_cuda_graph_decoder_weight_modes(cuda_mode_pair, graph):
    """CudaGraphDecoder over the optimized model's reduced-mode records: the tokens of HF generate on the same
    optimized model (the gpt2kern walk over the same weights), and gpt2kern.generate's (the decoder again, and a
    plain CUDA model with weights=mode: a private pack of the same values)."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    mode, _, gpu = cuda_mode_pair
    B, T, n = 2, 9, 24
    ids = torch.randint(0, gpu.config.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dec = CudaGraphDecoder(gpu, batch_size=B, max_len=T + n, use_graph=graph)
    assert dec.W.mode == mode
    ours = dec.generate(ids, n, attention_mask=mask)
    hf = gpu.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert gpt2kern.fallback_reason(gpu) is None
    eos = gpu.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    assert _until_eos(hf, T, eos) == _until_eos(ours[:, : hf.shape[1]], T, eos)
    kw = dict(max_new_tokens=n, attention_mask=mask, eos_token_id=[])
    a = gpt2kern.generate(gpu, ids, **kw)
    plain = copy.deepcopy(gpu)
    gpt2kern.restore(plain)
    b = gpt2kern.generate(plain, ids, weights=mode, **kw)
    assert torch.equal(a.cpu(), ours.cpu()) and torch.equal(b.cpu(), a.cpu())
    assert dec.variants["gemv"] is None  # the table's gemv=2 was measured with fp32 weights: given only, below
    for gemv in (3, 4, 5):
        with pytest.raises(ValueError, match=f"gemv={gemv} reads fp32"):
            CudaGraphDecoder(gpu, batch_size=B, max_len=T + n, gemv=gemv)
    # kv_write=3 (K/V stored by the reduced-mode GEMV itself): the same tokens and caches
    fused = CudaGraphDecoder(gpu, batch_size=B, max_len=T + n, use_graph=graph, kv_write=3)
    assert torch.equal(fused.generate(ids, n, attention_mask=mask), ours)
    assert torch.equal(fused.k_cache, dec.k_cache) and torch.equal(fused.v_cache, dec.v_cache)


@needs_cuda
@pytest.mark.parametrize("graph", [True, False])
@torch.no_grad()
def test_cuda_graph_decoder_gemv2_weight_modes(cuda_mode_pair, graph):
    """gemv=2 over a reduced mode: every step matmul is ops.matmul_nk on the mode's [out, in] copy (16-byte loads;
    int8 with its [out, in / group] scales) holding the values conv1d reads; the greedy tokens of HF generate on the
    same optimized model (the gpt2kern walk over the same weights), at B = 2 with left padding and at B = 1, and
    the step's logits within LOGITS_ATOL of the conv1d-path decoder's."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    mode, _, gpu = cuda_mode_pair
    B, T, n = 2, 9, 24
    ids = torch.randint(0, gpu.config.vocab_size, (B, T), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dec = CudaGraphDecoder(gpu, batch_size=B, max_len=T + n, use_graph=graph, gemv=2, kv_write=2)
    assert (dec.variants["gemv"], dec.variants["kv_write"]) == (2, 2) and dec.W.mode == mode
    for key, lin in dec._lins.items():
        w, s, _ = dec._nk[key]
        assert w.shape == (lin.n_out, lin.n_in) and w.dtype == lin.data.dtype and w.is_cuda
        assert (s is None) == (mode != "int8")
    eos = gpu.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    ours = dec.generate(ids, n, attention_mask=mask)
    hf = gpu.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert gpt2kern.fallback_reason(gpu) is None
    assert _until_eos(hf, T, eos) == _until_eos(ours[:, : hf.shape[1]], T, eos)
    one = CudaGraphDecoder(gpu, batch_size=1, max_len=T + n, use_graph=graph, gemv=2)
    hf1 = gpu.generate(ids[:1], max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert _until_eos(hf1, T, eos) == _until_eos(one.generate(ids[:1], n)[:, : hf1.shape[1]], T, eos)
    # the step's logits against the conv1d-path decoder's (the same stored weights, another GEMV)
    plain = CudaGraphDecoder(gpu, batch_size=B, max_len=T + n, use_graph=graph)
    assert plain.variants["gemv"] is None
    a, b = dec.prefill(ids, attention_mask=mask), plain.prefill(ids, attention_mask=mask)
    for _ in range(3):
        nxt = a.argmax(-1)
        a, b = dec.step(nxt).clone(), plain.step(nxt).clone()
        assert (a - b).abs().max().item() <= LOGITS_ATOL
    with pytest.raises(ValueError, match="gemv=2 takes kv_write=2"):
        CudaGraphDecoder(gpu, batch_size=B, max_len=T + n, gemv=2, kv_write=3)
