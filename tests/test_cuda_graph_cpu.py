"""The CUDA-graph decoder without a GPU: its variant rules cell by cell (pure Python), and its wiring of the one body
(prefill and step, every variant) run on CPU with the CUDA-only ops replaced by reference implementations over the
CPU kernels, against HF's greedy tokens."""
import contextlib
import dataclasses
import types

import pytest
import torch

from gpt2kern import ops
from gpt2kern.decode import cuda_graph
from gpt2kern.kernels.weights import Linear, WeightFormat, int8_group
from gpt2kern.model import guard

# Every cell of the rules: the step's matmul kernel where the variants run, else what refusals() names (gemv:fp32 =
# gemv reads fp32 weights, gemv:rows / kv:rows = more rows than a decode GEMV takes, kv:gemv2 = kv_write 3 after
# gemv 2). Modes fp16 and int8 share a line ("reduced").
GRID = """
mode     gemv kv_write  B=1                B=32               B=33
fp32     None 2         conv1d             conv1d             conv1d
fp32     None 3         decode             decode             kv:rows
fp32     2    2         nk                 nk                 gemv:rows
fp32     2    3         kv:gemv2           kv:gemv2           gemv:rows,kv:gemv2
fp32     3    2         decode             decode             gemv:rows
fp32     3    3         decode             decode             gemv:rows,kv:rows
fp32     4    2         decode             decode             gemv:rows
fp32     4    3         decode             decode             gemv:rows,kv:rows
fp32     5    2         prefill            prefill            gemv:rows
fp32     5    3         kv:gemv5           kv:gemv5           gemv:rows,kv:gemv5
reduced  None 2         conv1d             conv1d             conv1d
reduced  None 3         decode             decode             kv:rows
reduced  2    2         nk                 nk                 gemv:rows
reduced  2    3         kv:gemv2           kv:gemv2           gemv:rows,kv:gemv2
reduced  3    2         gemv:fp32          gemv:fp32          gemv:fp32
reduced  3    3         gemv:fp32          gemv:fp32          gemv:fp32,kv:rows
reduced  4    2         gemv:fp32          gemv:fp32          gemv:fp32
reduced  4    3         gemv:fp32          gemv:fp32          gemv:fp32,kv:rows
reduced  5    2         gemv:fp32          gemv:fp32          gemv:fp32
reduced  5    3         gemv:fp32,kv:gemv5 gemv:fp32,kv:gemv5 gemv:fp32,kv:gemv5
"""
BATCHES = (1, 32, 33)
REASONS = {  # code -> (refusals' key, the reason's text for variant value g / k, mode, batch b)
    "gemv:fp32": ("gemv", lambda g, k, mode, b: f"gemv={g} reads fp32 weights; weights={mode!r} run conv1d's GEMV "
                                                f"(leave gemv unset) or gemv=2"),
    "gemv:rows": ("gemv", lambda g, k, mode, b: f"gemv={g} takes batch_size <= 32 (a decode GEMV's rows), got {b}"),
    "kv:rows": ("kv_write", lambda g, k, mode, b: f"kv_write={k} takes batch_size <= 32 (a decode GEMV's rows), "
                                                  f"got {b}"),
    "kv:gemv2": ("kv_write", lambda g, k, mode, b: "kv_write=3 stores K/V from an [in, out] GEMV (gemv 3 or 4, or the "
                                                   "reduced weight modes'); gemv=2 takes kv_write=2"),
    "kv:gemv5": ("kv_write", lambda g, k, mode, b: "kv_write=3 stores K/V from an [in, out] GEMV (gemv 3 or 4, or the "
                                                   "reduced weight modes'); gemv=5 takes kv_write=2"),
}


def grid():
    for line in GRID.strip().splitlines()[1:]:
        mode, g, k, *cells = line.split()
        for m in (("fp32",) if mode == "fp32" else ("fp16", "int8")):
            for b, cell in zip(BATCHES, cells):
                yield m, None if g == "None" else int(g), int(k), b, cell


def test_the_grid_covers_every_cell():
    cells = {(m, g, k, b) for m, g, k, b, _ in grid()}
    want = {(m, g, k, b) for m in ("fp32", "fp16", "int8") for g in (None, *cuda_graph.VARIANTS["gemv"])
            for k in cuda_graph.VARIANTS["kv_write"] for b in BATCHES}
    assert cells == want and len(cells) == 90


@pytest.mark.parametrize("mode,gemv,kv_write,batch,cell", list(grid()))
def test_variant_rules(mode, gemv, kv_write, batch, cell):
    v = dict(gemv=gemv, kv_write=kv_write)
    why = cuda_graph.refusals(v, batch, mode)
    if cell in ("conv1d", "decode", "nk", "prefill"):
        assert why == {} and cuda_graph.step_matmul(v) == cell
    else:
        want = {}
        for code in cell.split(","):
            key, text = REASONS[code]
            want[key] = text(gemv, kv_write, mode, batch)
        assert why == want
    # the chooser never picks a cell that cannot run: a variant it chose (from the table) steps back to one that
    # can; only a variant given is kept and refused
    table = {"GPU": {"by_batch": {"1": v}}} if gemv is not None else {}  # (the table names gemv 2-4 only)
    for given in ({}, dict(gemv=gemv), dict(kv_write=kv_write)):
        given = {k: x for k, x in given.items() if x is not None}
        got = cuda_graph.default_variants("GPU", batch, mode, given=given, table=table)
        assert {k: got[k] for k in given} == given
        assert set(cuda_graph.refusals(got, batch, mode)) <= set(given), got


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8"])
def test_reduced_modes_run_gemv2_when_given(mode):
    """gemv=2 runs every weight mode, but the table (measured with fp32 weights) chooses it for fp32 only: a reduced
    mode keeps conv1d's path unless gemv=2 is given, and kv_write=3 given still steps a chosen gemv back."""
    table = {"GPU": {"by_batch": {"1": dict(gemv=2, kv_write=2, launch=1)}}}

    def pick(mode, **given):
        got = cuda_graph.default_variants("GPU", 1, mode, given=given, table=table)
        return {k: got[k] for k in ("gemv", "kv_write")}

    assert pick("fp32") == dict(gemv=2, kv_write=2)
    assert pick(mode) == dict(gemv=None, kv_write=2)
    assert pick(mode, gemv=2) == dict(gemv=2, kv_write=2)
    assert pick(mode, kv_write=3) == dict(gemv=None, kv_write=3)
    assert cuda_graph.refusals(dict(gemv=2, kv_write=2), 1, mode) == {}
    assert cuda_graph.step_matmul(dict(gemv=2, kv_write=2)) == "nk"


# ---------------------------------------------------------------- the decoder's wiring on CPU

def _kv_write(qkv, k_cache, v_cache, slot):
    B, H, Tmax, D = k_cache.shape
    E = H * D
    s = int(slot[0])
    if 0 <= s < Tmax:  # as the kernel: a slot outside the cache writes nothing
        q = qkv.reshape(B, 3 * E)
        k_cache[:, :, s] = q[:, E:2 * E].view(B, H, D)
        v_cache[:, :, s] = q[:, 2 * E:].view(B, H, D)


@pytest.fixture
def emulated(monkeypatch):
    """The CUDA-only ops as references over the CPU kernels (recording each call), the decoder's CUDA device calls
    as no-ops, and the guard's "needs CUDA" waived; yields the list of calls."""
    calls = []
    conv1d_cpu, attention, embedding = ops.conv1d, ops.attention, ops.embedding

    def fp32(weight, scales, layout):  # a reduced mode's CUDA storage ('kn' / 'nk') as the float32 it stands for
        if weight.dtype == torch.float32:
            return weight
        w = weight.float()
        if scales is not None:
            w = w * scales.repeat_interleave(weight.shape[0] // scales.shape[0], 0) if layout == "kn" else (
                w * scales.repeat_interleave(weight.shape[1] // scales.shape[1], 1))
        return w

    def conv1d(x, weight, bias=None, epilogue="none", residual=None, out_features=-1, layout="kn", scales=None):
        if weight.dtype == torch.float32:
            return conv1d_cpu(x, weight, bias, epilogue, residual, out_features, layout, scales)
        return conv1d_cpu(x, fp32(weight, scales, layout), bias, epilogue, residual, out_features, layout)

    def matmul_decode(x, weight, bias=None, epilogue="none", residual=None, scales=None, k_cache=None, v_cache=None,
                      slot=None, counters=None):
        assert weight.shape[0] == x.shape[-1], "matmul_decode reads [in, out] weights"
        if counters is not None:
            assert counters.dtype == torch.int32 and not counters.any() and counters.numel() * 32 >= weight.shape[1]
        y = conv1d(x, weight, bias, epilogue, residual, -1, "kn", scales)
        if k_cache is not None:
            _kv_write(y, k_cache, v_cache, slot)
        calls.append(("matmul_decode", counters is not None, k_cache is not None))
        return y

    def matmul_nk(x, weight, bias=None, epilogue="none", residual=None, scales=None):
        assert weight.shape[1] == x.shape[-1] and weight.is_contiguous(), "matmul_nk reads [out, in] copies"
        assert (scales is not None) == (weight.dtype == torch.int8), "int8 weights come with their scales"
        if scales is not None:  # [out, in / group], contiguous (the kernel's layout)
            assert scales.shape[0] == weight.shape[0] and weight.shape[1] % scales.shape[1] == 0
            assert scales.dtype == torch.float32 and scales.is_contiguous()
        calls.append(("matmul_nk", weight.dtype))
        return conv1d(x, weight, bias, epilogue, residual, weight.shape[0], "nk", scales)

    def kv_write(qkv, k_cache, v_cache, slot):
        calls.append(("kv_write",))
        _kv_write(qkv, k_cache, v_cache, slot)

    def decode_attention(q, k, v, key_mask, kv_len, scale):
        calls.append(("decode_attention",))
        n = int(kv_len[0])
        return attention(q, k[:, :, :n], v[:, :, :n], key_mask[:, :n], None, scale, 0, False)

    def embedding_step(input_ids, wte, wpe, cursor):
        calls.append(("embedding_step",))
        cursor.add_(1)
        return embedding(input_ids, wte, wpe, cursor[2:].view(-1, 1))

    def counted_conv1d(*a, **kw):
        calls.append(("conv1d",))
        return conv1d(*a, **kw)

    pdl = [False]
    knobs = dict(prefill_gemm=2, prefill_attention=1)

    def cuda_variant(name, value=0):
        if value > 0:
            knobs[name] = value
        return knobs[name]

    def matmul_prefill(x, weight, bias=None, epilogue="none", residual=None, splits=0):
        assert weight.shape[0] == x.shape[-1], "matmul_prefill reads [in, out] weights"
        calls.append(("matmul_prefill", knobs["prefill_gemm"]))
        return conv1d(x, weight, bias, epilogue, residual, -1, "kn")

    def set_cuda_pdl(on):
        calls.append(("pdl", on))
        before, pdl[0] = pdl[0], on
        return before

    for name, f in dict(matmul_decode=matmul_decode, matmul_nk=matmul_nk, kv_write=kv_write,
                        decode_attention=decode_attention, embedding_step=embedding_step, conv1d=counted_conv1d,
                        set_cuda_pdl=set_cuda_pdl, cuda_variant=cuda_variant, matmul_prefill=matmul_prefill,
                        has_cuda=lambda: True,
                        check_cuda_errors=lambda synchronize=True: None).items():
        monkeypatch.setattr(ops, name, f)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "CPU emulation")
    why_not = guard.why_not
    monkeypatch.setattr(guard, "why_not", lambda st, entry, **kw: None if entry == "cuda_graph"
                        else why_not(st, entry, **kw))
    state_of = cuda_graph.state_of

    def cuda_like_state(model, mode=None):  # the CUDA storage: every matmul weight [in, out], the lm_head's too
        st = state_of(model, None)  # fp32, read in place; a reduced mode: its 'kn' copies, as Linear.of on CUDA
        mode = mode or getattr(model, "_emulated_mode", "fp32")

        def kn(lin):
            fmt = WeightFormat("kn", mode, lin.n_in, lin.n_out, int8_group(lin.n_in) if mode == "int8" else 0)
            return Linear(*fmt.make(lin.data.contiguous()), lin.bias, fmt)

        W = st.weights
        head = Linear.of(W.lm_head.data.t().contiguous(), None)
        if mode != "fp32":
            W = dataclasses.replace(W, mode=mode, layers=tuple(
                dataclasses.replace(L, **{w: kn(getattr(L, w)) for w in ("c_attn", "attn_proj", "c_fc", "mlp_proj")})
                for L in W.layers))
            head = kn(head)
        return types.SimpleNamespace(device=st.device, weights=dataclasses.replace(W, lm_head=head))

    monkeypatch.setattr(cuda_graph, "state_of", cuda_like_state)
    yield calls


CASES = [(None, 2, 3, 1), (None, 3, 3, 1), (2, 2, 3, 1), (3, 2, 3, 1), (3, 3, 3, 1), (4, 2, 3, 1), (4, 3, 3, 1),
         (None, 2, 33, 1), (2, 2, 3, 2), (4, 3, 3, 2), (None, 2, 33, 2), (5, 2, 3, 1), (5, 2, 32, 2)]


@pytest.mark.parametrize("gemv,kv_write,B,launch", CASES, ids=[f"gemv{g}-kv{k}-B{b}-launch{la}"
                                                               for g, k, b, la in CASES])
@torch.no_grad()
def test_decoder_wiring_matches_hf_greedy(tiny, emulated, monkeypatch, gemv, kv_write, B, launch):
    """The decoder's prefill and eager step (use_graph=False: the body the graph captures) give HF generate's greedy
    tokens, with left padding, and each step launches the kernels its variants name: one matmul per weight, the
    K/V write where kv_write puts it, all of them with programmatic dependent launch on for launch 2 (and off
    again after the step)."""
    if gemv is None and B <= ops.GEMV_MAX_ROWS:  # conv1d's path, chosen (never given) as for a reduced weight mode
        choose = cuda_graph.default_variants
        monkeypatch.setattr(cuda_graph, "default_variants",
                            lambda *a, **kw: dict(choose(*a, **kw), gemv=None))
    T, n = 6, 8
    torch.manual_seed(B)
    ids = torch.randint(0, tiny.config.vocab_size, (B, T))
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # left padding
    dec = cuda_graph.CudaGraphDecoder(tiny, batch_size=B, max_len=T + n, use_graph=False, gemv=gemv,
                                      kv_write=kv_write, launch=launch)
    assert dec.variants == dict(gemv=gemv, kv_write=kv_write, launch=launch)
    ours = dec.generate(ids, n, attention_mask=mask)
    hf = tiny.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(ours[:, :hf.shape[1]], hf)

    emulated.clear()
    dec.step(ours[:, -1])
    if launch == 2:  # the whole step between turning it on and restoring it
        assert emulated[0] == ("pdl", True) and emulated[-1] == ("pdl", False)
        assert emulated.count(("pdl", True)) == 1
        del emulated[0], emulated[-1]
    assert not any(c[0] == "pdl" for c in emulated)
    L = tiny.config.n_layer
    kind = {2: "matmul_nk", 3: "matmul_decode", 4: "matmul_decode", 5: "matmul_prefill"}.get(
        gemv, "matmul_decode" if kv_write == 3 else "conv1d")
    matmuls = [c for c in emulated if c[0] in ("conv1d", "matmul_nk", "matmul_decode", "matmul_prefill")]
    assert [c[0] for c in matmuls] == [kind] * (4 * L + 1)
    if kind == "matmul_prefill":  # under prefill GEMM variant 3 (tensor cores), set for the step only
        assert all(c[1] == 3 for c in matmuls) and ops.cuda_variant("prefill_gemm") == 2
    if kind == "matmul_decode":
        assert all(c[1] == (gemv == 4) for c in matmuls)  # the split-K counters: gemv 4's only
        assert [c[2] for c in matmuls] == ([kv_write == 3, False, False, False] * L) + [False]  # c_attn stores K/V
    assert emulated.count(("kv_write",)) == (L if kv_write == 2 else 0)
    assert emulated.count(("embedding_step",)) == (1 if kv_write == 3 else 0)
    assert emulated.count(("decode_attention",)) == L


@torch.no_grad()
def test_decoder_step_logits_match_hf(tiny, emulated):
    """Step by step, the logits follow HF's full forward over the same tokens (positions after left padding)."""
    from conftest import LOGITS_ATOL
    B, T = 2, 5
    ids = torch.randint(0, tiny.config.vocab_size, (B, T))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dec = cuda_graph.CudaGraphDecoder(tiny, batch_size=B, max_len=T + 4, use_graph=False, gemv=4, kv_write=3)
    logits, seq = dec.prefill(ids, attention_mask=mask), ids
    for _ in range(3):
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        logits = dec.step(nxt).clone()
    full = torch.cat([mask, torch.ones(B, 3, dtype=mask.dtype)], 1)
    pos = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    want = tiny(seq, attention_mask=full, position_ids=pos).logits[:, -1]
    assert (want - logits).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8"])
@torch.no_grad()
def test_decoder_gemv2_over_a_reduced_mode(tiny, emulated, monkeypatch, mode):
    """weights in a reduced mode and gemv=2: every step matmul is matmul_nk over the mode's [out, in] copy (int8 with
    its [out, in / group] scales), holding the values of the 'kn' storage conv1d reads (WeightFormat.nk_copy), and
    the greedy tokens are those of the same decoder on conv1d's path (gemv chosen None)."""
    monkeypatch.setattr(tiny, "_emulated_mode", mode, raising=False)
    B, T, n = 2, 6, 8
    torch.manual_seed(3)
    ids = torch.randint(0, tiny.config.vocab_size, (B, T))
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0
    dec = cuda_graph.CudaGraphDecoder(tiny, batch_size=B, max_len=T + n, use_graph=False, gemv=2, kv_write=2)
    assert (dec.variants["gemv"], dec.variants["kv_write"]) == (2, 2) and dec.W.mode == mode
    for key, lin in dec._lins.items():
        w, s, b = dec._nk[key]
        assert w.shape == (lin.n_out, lin.n_in) and w.dtype == lin.data.dtype and w.is_contiguous()
        assert (s is None) == (mode != "int8") and b is lin.bias
        fmt = dataclasses.replace(lin.fmt, layout="nk")
        assert torch.equal(fmt.unpack(w, s), lin.fmt.unpack(lin.data, lin.scales))
    ours = dec.generate(ids, n, attention_mask=mask)
    emulated.clear()
    dec.step(ours[:, -1])
    L = tiny.config.n_layer
    want_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[mode]
    assert [c for c in emulated if c[0] in ("conv1d", "matmul_nk", "matmul_decode")] == \
        [("matmul_nk", want_dtype)] * (4 * L + 1)
    choose = cuda_graph.default_variants
    monkeypatch.setattr(cuda_graph, "default_variants", lambda *a, **kw: dict(choose(*a, **kw), gemv=None))
    plain = cuda_graph.CudaGraphDecoder(tiny, batch_size=B, max_len=T + n, use_graph=False, kv_write=2)
    assert plain.variants["gemv"] is None
    assert torch.equal(plain.generate(ids, n, attention_mask=mask), ours)
