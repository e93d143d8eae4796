"""The optimized forward vs HF eager fp32: every layer in execution order, then end to end and through generate."""
import copy
import io

import pytest
import torch
from conftest import DEVICES, LOGITS_ATOL, pair
from transformers import GPT2LMHeadModel, GPT2Model

import gpt2kern
import gpt2kern.model.dropin


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

TRACE_MODULES = ["wte", "wpe", "ln_1", "attn.c_attn", "attn", "ln_2", "mlp.act", "mlp", "ln_f", "lm_head"]


def hf_module_outputs(model, ids):
    """Run HF's model with forward hooks on every module the seed walks through; [(name, output)] in order."""
    rec, hooks = [], []
    for name, mod in model.named_modules():
        short = name.removeprefix("transformer.")
        leaf = short.split(".", 2)[-1] if short.startswith("h.") else short
        if leaf in TRACE_MODULES or (short.startswith("h.") and short.count(".") == 1):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, short=short: rec.append((short, (o[0] if isinstance(o, tuple) else o).clone()))))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return rec


@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_every_layer_matches_hf_in_order(which, request):
    ref, opt = pair(request.getfixturevalue(which))
    ids = torch.randint(0, ref.config.vocab_size, (2, 13))
    hf = hf_module_outputs(ref, ids)
    with gpt2kern.tracing(opt) as ours:
        opt(ids)
    hf_names = [n for n, _ in hf]
    ours_names = [n for n, _ in ours]
    # our trace is HF's execution order, where the fused c_fc+act kernel stands for HF's `act`
    assert [n for n in hf_names if n in set(ours_names)] == ours_names
    hf_out = dict(hf)
    worst = 0.0
    for name, t in ours:
        torch.testing.assert_close(t, hf_out[name], atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        worst = max(worst, (t - hf_out[name]).abs().max().item())
    n_layers = ref.config.n_layer
    assert len(ours) == 3 + 7 * n_layers + 1
    print(f"{which}: {len(ours)} traced steps, worst abs diff {worst:.3g}")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_logits_match_hf_eager(which, dev, request):
    ref, opt = pair(request.getfixturevalue(which), dev)
    for B, T in [(1, 1), (2, 17), (1, ref.config.n_positions)]:
        ids = torch.randint(0, ref.config.vocab_size, (B, T), device=dev)
        a, b = ref(ids).logits, opt(ids).logits
        assert gpt2kern.fallback_reason(opt) is None
        err = (a - b).abs().max().item()
        assert err <= LOGITS_ATOL, f"B={B} T={T}: max |Δlogits| {err:.3g}"
        print(f"{which} B={B} T={T}: max |Δlogits| = {err:.3g}")


@pytest.mark.parametrize("variant", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False),
                                     dict(reorder_and_upcast_attn=True), dict(n_inner=40, layer_norm_epsilon=1e-3)])
def test_config_variants_match_hf(tiny, variant):
    """GPT-2 config switches the kernels honour (the attention scale per layer, no scale, HF's upcast-and-reorder
    attention, an odd MLP width, another LayerNorm eps): HF's logits and greedy tokens, on the fast path."""
    cfg = copy.deepcopy(tiny.config)
    for k, v in variant.items():
        setattr(cfg, k, v)
    model = GPT2LMHeadModel(cfg).eval()
    if "n_inner" not in variant:  # tiny's weights (GPT-2-like outliers), so the attention switches matter
        model.load_state_dict(tiny.state_dict())
    ref, opt = pair(model)
    ids = torch.randint(0, cfg.vocab_size - 1, (2, 19), generator=torch.Generator().manual_seed(1))
    a, b = ref(ids).logits, opt(ids).logits
    assert gpt2kern.fallback_reason(opt) is None
    assert (a - b).abs().max().item() <= LOGITS_ATOL
    if "n_inner" not in variant and "reorder_and_upcast_attn" not in variant:  # (fp32: the same sum, reordered)
        assert (a - tiny(ids).logits).abs().max() > 100 * LOGITS_ATOL  # the switch does change what HF computes
    x, y = gen_both(ref, opt, ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(x, y)


@pytest.mark.parametrize("dev", DEVICES)
def test_hidden_states_and_gpt2model(tiny, dev):
    ref, opt = pair(tiny, dev)
    ids = torch.randint(0, 99, (2, 9), device=dev)
    a = ref(ids, output_hidden_states=True)
    b = opt(ids, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    base = GPT2Model(tiny.config).eval()
    base.load_state_dict(tiny.transformer.state_dict())
    base.to(dev)
    fast = gpt2kern.optimize(copy.deepcopy(base))
    out_a, out_b = base(ids), fast(ids)
    torch.testing.assert_close(out_b.last_hidden_state, out_a.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert gpt2kern.fallback_reason(fast) is None
    assert isinstance(fast(ids, return_dict=False), tuple)


@pytest.mark.parametrize("dev", DEVICES)
def test_kwargs_position_ids_token_types_logits_to_keep(tiny, dev):
    ref, opt = pair(tiny, dev)
    ids = torch.randint(0, 99, (2, 9), device=dev)
    tt = torch.randint(0, 99, (2, 9), device=dev)
    pos = torch.arange(3, 12, device=dev)[None].expand(2, 9)
    kw = dict(token_type_ids=tt, position_ids=pos, logits_to_keep=2, use_cache=False)
    a, b = ref(ids, **kw), opt(ids, **kw)
    assert b.logits.shape == (2, 2, 99)
    torch.testing.assert_close(b.logits, a.logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("dev", DEVICES)
def test_masks_2d_and_4d(tiny, dev):
    ref, opt = pair(tiny, dev)
    ids = torch.randint(0, 99, (3, 8), device=dev)
    mask = torch.ones(3, 8, dtype=torch.long, device=dev)
    mask[1, :3] = 0
    mask[2, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = ref(ids, attention_mask=mask, position_ids=pos).logits
    b = opt(ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=LOGITS_ATOL, rtol=0)
    # a 4-D boolean mask (True = attend) as static-cache generate passes it
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool, device=dev))[None, None].expand(3, 1, 8, 8)
    m4 = causal & valid[:, None, None, :]
    b4 = opt(ids, attention_mask=m4, position_ids=pos).logits
    torch.testing.assert_close(b4[valid], a[valid], atol=LOGITS_ATOL, rtol=0)
    f4 = torch.zeros(m4.shape, device=dev).masked_fill(~m4, torch.finfo(torch.float32).min)
    torch.testing.assert_close(opt(ids, attention_mask=f4, position_ids=pos).logits[valid], a[valid],
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("dev", DEVICES)
def test_continue_from_past_key_values(distil, dev):
    ref, opt = pair(distil, dev)
    ids = torch.randint(0, 50257, (2, 12), device=dev)
    name = gpt2kern.model.dropin._CACHE_ARG  # `cache` in transformers 5.2x, `past_key_values` before
    logits = []
    for model in (ref, opt):
        out1 = model(ids[:, :8], use_cache=True)
        logits.append(model(ids[:, 8:], **{name: getattr(out1, name)}, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=LOGITS_ATOL, rtol=0)


def prompts(n, lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (L,), generator=g) for L in lens[:n]]


def left_pad(seqs, pad_id):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    return ids, mask


def gen_both(ref, opt, ids, **kw):
    kw.setdefault("pad_token_id", ref.config.eos_token_id)
    dev = ref.device
    ids = ids.to(dev)
    if kw.get("attention_mask") is not None:
        kw["attention_mask"] = kw["attention_mask"].to(dev)
    a = ref.generate(ids, **kw)
    b = opt.generate(ids, **kw)
    return a, b


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_greedy_128_tokens_identical(which, dev, request):
    ref, opt = pair(request.getfixturevalue(which), dev)
    ids = torch.randint(0, ref.config.vocab_size - 1, (1, 16), generator=torch.Generator().manual_seed(5))
    a, b = gen_both(ref, opt, ids, max_new_tokens=128, do_sample=False)
    assert a.shape[1] == 16 + 128
    assert torch.equal(a, b)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_beam_search_identical(which, dev, request):
    ref, opt = pair(request.getfixturevalue(which), dev)
    ids = torch.randint(0, ref.config.vocab_size - 1, (2, 10), generator=torch.Generator().manual_seed(6))
    a, b = gen_both(ref, opt, ids, max_new_tokens=24, num_beams=3, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_left_padded_batch_identical(which, dev, request):
    ref, opt = pair(request.getfixturevalue(which), dev)
    V = ref.config.vocab_size
    ids, mask = left_pad(prompts(4, [5, 11, 2, 8], V), ref.config.eos_token_id % V)
    a, b = gen_both(ref, opt, ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_static_cache_identical(which, dev, request):
    ref, opt = pair(request.getfixturevalue(which), dev)
    V = ref.config.vocab_size
    ids, mask = left_pad(prompts(3, [6, 9, 3], V, 2), ref.config.eos_token_id % V)
    a, b = gen_both(ref, opt, ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                    cache_implementation="static")
    assert torch.equal(a, b)
    assert gpt2kern.fallback_reason(opt) is None


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_sampling_with_seed_identical(which, dev, request):
    ref, opt = pair(request.getfixturevalue(which), dev)
    ids = torch.randint(0, ref.config.vocab_size - 1, (2, 7), generator=torch.Generator().manual_seed(3)).to(dev)
    kw = dict(max_new_tokens=40, do_sample=True, top_k=50, top_p=0.95, temperature=0.8,
              pad_token_id=ref.config.eos_token_id)
    torch.manual_seed(1234)
    a = ref.generate(ids, **kw)
    torch.manual_seed(1234)
    b = opt.generate(ids, **kw)
    assert torch.equal(a, b)


# ---- decode steps under HF's generate: the whole body in one C++ call (_C.Body over DynamicCache)

class _CountingBody:
    """Stands in for the model's _C.Body and counts the decode steps it served."""

    def __init__(self, body):
        self.body, self.calls = body, 0

    def forward(self, *args):
        self.calls += 1
        return self.body.forward(*args)


def counting(opt):
    st = opt.transformer._gpt2kern
    st.body = _CountingBody(st.body)
    return st.body


@pytest.mark.parametrize("which", ["tiny", "distil"])
def test_generate_decode_steps_run_in_one_call(which, request):
    ref, opt = pair(request.getfixturevalue(which))
    body = counting(opt)
    V = ref.config.vocab_size
    ids, mask = left_pad(prompts(3, [7, 3, 10], V, 4), ref.config.eos_token_id % V)
    a, b = gen_both(ref, opt, ids, attention_mask=mask, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(a, b)
    assert body.calls == 19  # every step after the prompt's prefill
    a, b = gen_both(ref, opt, ids[:2, 3:], max_new_tokens=12, num_beams=3, do_sample=False, min_new_tokens=12)
    assert torch.equal(a, b)
    assert body.calls == 19 + 11


def test_body_step_equals_per_op_walk(distil):
    """The one-call step and the per-op walk (which tracing forces) run the same kernels in the same order: the
    same logits and the same grown cache, bit for bit."""
    ref, opt = pair(distil)
    body = counting(opt)
    ids, mask = left_pad(prompts(3, [9, 4, 12], 50257, 8), 50256)
    out = opt(ids, attention_mask=mask, use_cache=True)
    name = gpt2kern.model.dropin._CACHE_ARG
    c1 = getattr(out, name)
    c2 = copy.deepcopy(c1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    fast = opt(nxt, attention_mask=mask2, **{name: c1}, use_cache=True)
    assert body.calls == 1
    with gpt2kern.tracing(opt):
        walked = opt(nxt, attention_mask=mask2, **{name: c2}, use_cache=True)
    assert body.calls == 1
    assert torch.equal(fast.logits, walked.logits)
    for l1, l2 in zip(c1.layers, c2.layers):
        assert torch.equal(l1.keys, l2.keys) and torch.equal(l1.values, l2.values)
    ref_logits = ref(torch.cat([ids, nxt], 1), attention_mask=mask2).logits[:, -1]
    torch.testing.assert_close(fast.logits[:, -1], ref_logits, atol=LOGITS_ATOL, rtol=0)


def test_body_step_after_crop_and_without_cache(tiny):
    """A cropped cache holds non-contiguous views; use_cache=False has no past at all."""
    ref, opt = pair(tiny)
    body = counting(opt)
    name = gpt2kern.model.dropin._CACHE_ARG
    ids = torch.randint(0, 98, (2, 10), generator=torch.Generator().manual_seed(9))
    cache = getattr(opt(ids, use_cache=True), name)
    cache.crop(-3)  # keep 7
    got = opt(ids[:, 7:8], **{name: cache}, use_cache=True).logits
    assert body.calls == 1
    torch.testing.assert_close(got[:, -1], ref(ids[:, :8]).logits[:, -1], atol=LOGITS_ATOL, rtol=0)
    got = opt(ids[:, :1], use_cache=False).logits
    assert body.calls == 2
    torch.testing.assert_close(got, ref(ids[:, :1]).logits, atol=LOGITS_ATOL, rtol=0)
    got = opt(ids[:, :4].int(), position_ids=torch.arange(4, dtype=torch.int32)[None], use_cache=False).logits
    assert body.calls == 3  # int32 ids and positions, as HF accepts them
    torch.testing.assert_close(got, ref(ids[:, :4]).logits, atol=LOGITS_ATOL, rtol=0)


def test_body_grows_cache_in_place_and_never_rewrites_a_held_view(tiny):
    """Decode steps append to the body's own cache buffers in place (no copy of the past), but never write where a
    tensor someone may hold can see: after a crop, a reorder or a deepcopy, the past is copied to a new buffer."""
    ref, opt = pair(tiny)
    name = gpt2kern.model.dropin._CACHE_ARG
    ids = torch.randint(0, 98, (2, 30), generator=torch.Generator().manual_seed(11))
    cache = getattr(opt(ids[:, :10], use_cache=True), name)

    def step(c, t):
        return opt(ids[:, t:t + 1], **{name: c}, use_cache=True).logits[:, -1]

    step(cache, 10)  # the prefill's cat-made tensors are copied into a growable buffer once
    ptr = cache.layers[0].keys.untyped_storage().data_ptr()
    held, held_copy = cache.layers[0].keys, cache.layers[0].keys.clone()
    for t in range(11, 14):
        step(cache, t)
    assert cache.layers[0].keys.untyped_storage().data_ptr() == ptr  # grown in place
    assert cache.get_seq_length() == 14 and torch.equal(held, held_copy)
    longer, longer_copy = cache.layers[1].values, cache.layers[1].values.clone()
    cache.crop(-2)  # back to 12 tokens: positions 12, 13 of the buffer are still visible through `longer`
    got = step(cache, 20)
    assert cache.layers[0].keys.untyped_storage().data_ptr() != ptr  # copied, not written over
    assert torch.equal(longer, longer_copy)
    want = ref(torch.cat([ids[:, :12], ids[:, 20:21]], 1)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)
    buf = io.BytesIO()
    torch.save(cache, buf)  # the cache pickles as HF's does (nothing of gpt2kern's rides on it)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.layers[0].keys, cache.layers[0].keys)
    twin = copy.deepcopy(cache)  # continuing both gives each its own answer
    a, b = step(cache, 21), step(twin, 22)
    torch.testing.assert_close(a, ref(torch.cat([ids[:, :12], ids[:, 20:22]], 1)).logits[:, -1], atol=LOGITS_ATOL,
                               rtol=0)
    torch.testing.assert_close(b, ref(torch.cat([ids[:, :12], ids[:, 20:21], ids[:, 22:23]], 1)).logits[:, -1],
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_body_step_mask_dtypes_and_positions(tiny, dtype):
    """HF's 2-D masks in any dtype it accepts, explicit or implied positions: the one-call step matches HF."""
    ref, opt = pair(tiny)
    body = counting(opt)
    name = gpt2kern.model.dropin._CACHE_ARG
    ids, mask = left_pad(prompts(3, [6, 2, 9], 99, 12), 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = getattr(opt(ids, attention_mask=mask, position_ids=pos, use_cache=True), name)
    nxt = torch.tensor([[5], [7], [11]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    pos2 = pos[:, -1:] + 1
    got = opt(nxt, attention_mask=mask2.to(dtype), position_ids=pos2, **{name: cache}, use_cache=True).logits
    assert body.calls == 1
    want = ref(torch.cat([ids, nxt], 1), attention_mask=mask2, position_ids=torch.cat([pos, pos2], 1)).logits
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=LOGITS_ATOL, rtol=0)
