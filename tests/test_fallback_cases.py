"""Fallback honesty, the cases tests/test_fallback.py does not cover: for every README "What runs where" case, the
optimized model's answer is HF's own (bit for bit, same dtype and device), and fallback_reason says why."""
import copy

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import gpt2kern
from gpt2kern.model.dropin import _CACHE_ARG as CACHE  # past_key_values, or cache in newer transformers

IDS = torch.randint(0, 98, (2, 6), generator=torch.Generator().manual_seed(0))


def ref_and_opt(model):
    return copy.deepcopy(model), gpt2kern.optimize(copy.deepcopy(model))


def same(a, b):
    assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
    if a.device.type != "meta":
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_not_float32_model(tiny, dtype):
    ref, opt = ref_and_opt(tiny)
    ref.to(dtype), opt.to(dtype)  # after optimize(): the weights' dtype change is noticed at the next call
    with torch.no_grad():
        a, b = ref(IDS).logits, opt(IDS).logits
    assert gpt2kern.fallback_reason(opt).startswith("not a float32 model on CPU")
    same(a, b)
    with torch.no_grad():  # and back: repacked, the kernels serve again
        opt.float()
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None


def test_not_on_cpu(tiny):
    """Another device (meta stands in for a GPU here): HF's path, HF's output type."""
    ref, opt = ref_and_opt(tiny)
    ref.to("meta"), opt.to("meta")
    with torch.no_grad():
        a, b = ref(IDS.to("meta")).logits, opt(IDS.to("meta")).logits
    assert gpt2kern.fallback_reason(opt).startswith("not a float32 model on CPU")
    same(a, b)


def test_cross_attention(tiny):
    cfg = copy.deepcopy(tiny.config)
    cfg.add_cross_attention = True
    torch.manual_seed(0)
    ref, opt = ref_and_opt(GPT2LMHeadModel(cfg).eval())
    enc = torch.randn(2, 4, cfg.n_embd)
    with torch.no_grad():
        a, b = ref(IDS, encoder_hidden_states=enc), opt(IDS, encoder_hidden_states=enc)
    assert gpt2kern.fallback_reason(opt) == "add_cross_attention=True"
    same(a.logits, b.logits)
    with torch.no_grad():  # generate continues HF's way too
        same(ref.generate(IDS[:1], encoder_hidden_states=enc[:1], max_new_tokens=4, do_sample=False),
             opt.generate(IDS[:1], encoder_hidden_states=enc[:1], max_new_tokens=4, do_sample=False))


def outcomes(models, *args, **kw):
    """Each model's answer: ("ok", logits) or (exception type, message)."""
    res = []
    for m in models:
        try:
            with torch.no_grad():
                res.append(("ok", m(*args, **kw).logits))
        except Exception as e:  # noqa: BLE001
            res.append((type(e), str(e)))
    return res


def same_outcome(a, b):
    if a[0] == "ok" and b[0] == "ok":
        same(a[1], b[1])
    else:
        assert a == b


def test_encoder_hidden_states_on_plain_model(tiny):
    """HF refuses (no cross-attention layers); so does the optimized model, with HF's own error."""
    ref, opt = ref_and_opt(tiny)
    a, b = outcomes((ref, opt), IDS, encoder_hidden_states=torch.randn(2, 4, tiny.config.n_embd))
    assert gpt2kern.fallback_reason(opt) == "cross-attention"
    same_outcome(a, b)


def test_encoder_decoder_cache(tiny):
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        a = ref(IDS, **{CACHE: EncoderDecoderCache(DynamicCache(), DynamicCache())}).logits
        b = opt(IDS, **{CACHE: EncoderDecoderCache(DynamicCache(), DynamicCache())}).logits
    assert gpt2kern.fallback_reason(opt) == "cache type EncoderDecoderCache"
    same(a, b)


def test_legacy_tuple_cache_behaves_as_hf(tiny):
    """A non-Cache past (legacy tuples) goes to HF, which decides what to do with it (transformers 5 rejects it):
    the same exception either way."""
    ref, opt = ref_and_opt(tiny)
    past = ((torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)),) * tiny.config.n_layer
    a, b = outcomes((ref, opt), IDS, **{CACHE: past})
    assert gpt2kern.fallback_reason(opt) == "cache type tuple"
    same_outcome(a, b)


def test_output_hidden_states_selecting_layers(tiny):
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        a, b = ref(IDS, output_hidden_states=[0, 1]), opt(IDS, output_hidden_states=[0, 1])
    assert gpt2kern.fallback_reason(opt) == "output_hidden_states selects layers"
    same(a.logits, b.logits)


def test_unsupported_activation_answer_is_hf(tiny):
    m = copy.deepcopy(tiny)
    m.config.activation_function = "gelu"
    ref, opt = ref_and_opt(m)
    with torch.no_grad():
        a, b = ref(IDS).logits, opt(IDS).logits
    assert "activation_function" in gpt2kern.fallback_reason(opt)
    same(a, b)


class Wrapped(torch.nn.Module):
    """A LoRA-style wrapper: the wrapped module's output plus a small change, so a fast path that ignored the
    wrapper would give a different answer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        if hasattr(inner, "weight"):
            self.weight = inner.weight

    def forward(self, x):
        return self.inner(x) * 1.25 + 0.5


def wrap(model, name):
    parent, leaf = ("transformer." + name).rsplit(".", 1)
    p = model.get_submodule(parent)
    setattr(p, leaf, Wrapped(getattr(p, leaf)))


@pytest.mark.parametrize("name", ["wte", "wpe", "h.0.ln_1", "h.1.attn.c_attn", "h.0.attn.c_proj", "h.1.ln_2",
                                  "h.0.mlp.c_fc", "h.1.mlp.act", "h.1.mlp.c_proj", "h.0.mlp", "ln_f"])
def test_wrapped_module_answer_is_hf(tiny, name):
    """PEFT/LoRA-style wrappers (or any subclass) on a module the kernels stand in for: HF's path runs them."""
    m = copy.deepcopy(tiny)
    wrap(m, name)
    ref, opt = ref_and_opt(m)
    with torch.no_grad():
        a, b = ref(IDS).logits, opt(IDS).logits
    assert gpt2kern.fallback_reason(opt) == f"{name} is Wrapped, not HF's {type(wrapped_inner(m, name)).__name__} " \
                                            "(the kernels compute the original)"
    same(a, b)
    assert not torch.equal(a, tiny(IDS).logits)  # the wrapper does change the answer
    assert torch.equal(gpt2kern.generate(opt, IDS, max_new_tokens=4),
                       ref.generate(IDS, max_new_tokens=4, do_sample=False))
    assert "is Wrapped" in gpt2kern.generate_fallback_reason()


def wrapped_inner(model, name):
    return model.transformer.get_submodule(name).inner


def test_module_wrapped_after_optimize_then_unwrapped(tiny):
    """optimize() then wrap: noticed at the next call (HF's answer); unwrap: the kernels serve again."""
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        opt(IDS)
        assert gpt2kern.fallback_reason(opt) is None
        for m in (ref, opt):
            wrap(m, "h.1.mlp.c_fc")
        a, b = ref(IDS).logits, opt(IDS).logits
        assert "h.1.mlp.c_fc is Wrapped" in gpt2kern.fallback_reason(opt)
        same(a, b)
        opt.transformer.h[1].mlp.c_fc = opt.transformer.h[1].mlp.c_fc.inner
        torch.testing.assert_close(opt(IDS).logits, tiny(IDS).logits, atol=1e-5, rtol=1e-5)
        assert gpt2kern.fallback_reason(opt) is None


def test_forward_patched_on_an_instance(tiny):
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        opt(IDS)
        for m in (ref, opt):
            ln = m.transformer.h[0].ln_2
            ln.forward = lambda x, f=ln.forward: f(x) * 2.0
        a, b = ref(IDS).logits, opt(IDS).logits
    assert gpt2kern.fallback_reason(opt) == "h.0.ln_2.forward is patched on the instance (the kernels would skip it)"
    same(a, b)


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_forward_hooks_inside_the_body_run(tiny, kind):
    """A hook on a module inside the body (activation capture, steering): HF's path runs, so the hook fires and
    what it returns counts; removed, the kernels serve again."""
    ref, opt = ref_and_opt(tiny)
    seen = {}

    def hook(name):
        if kind == "forward":
            return lambda mod, inp, out: seen.setdefault(name, []).append(out.clone()) or out * 0.5
        return lambda mod, inp: seen.setdefault(name, []).append(inp[0].clone()) or (inp[0] * 0.5,)

    with torch.no_grad():
        opt(IDS)
        handles = [getattr(m.transformer.h[1].mlp, f"register_{kind}_hook")(hook(n))
                   for n, m in (("ref", ref), ("opt", opt))]
        a, b = ref(IDS).logits, opt(IDS).logits
        assert gpt2kern.fallback_reason(opt) == "forward hooks on h.1.mlp"
        same(a, b)
        assert torch.equal(seen["ref"][0], seen["opt"][0])
        for h in handles:
            h.remove()
        opt(IDS)
        assert gpt2kern.fallback_reason(opt) is None


def test_hooks_on_the_body_and_lm_head_themselves_still_fast(tiny):
    """Hooks on the two modules whose forward is replaced wrap the fast forward: they fire, no fallback needed."""
    _, opt = ref_and_opt(tiny)
    seen = []
    hs = [opt.transformer.register_forward_hook(lambda *a: seen.append("body")),
          opt.lm_head.register_forward_hook(lambda *a: seen.append("lm_head"))]
    with torch.no_grad():
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None and seen == ["body", "lm_head"]
    for h in hs:
        h.remove()


def test_hfs_own_output_capturing_hooks_do_not_count(tiny):
    """transformers installs its output-capturing hooks for good on the first output_attentions call; they record
    only inside HF's forward, so later plain calls and output_hidden_states calls stay on the kernels."""
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        a = opt(IDS, output_attentions=True)
        assert gpt2kern.fallback_reason(opt) == "output_attentions" and len(a.attentions) == tiny.config.n_layer
        assert any(m._forward_hooks for m in opt.transformer.modules())  # HF's, now installed
        b = opt(IDS, output_hidden_states=True)
        assert gpt2kern.fallback_reason(opt) is None
        want = ref(IDS, output_hidden_states=True)
    for x, y in zip(b.hidden_states, want.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_global_forward_hook(tiny):
    ref, opt = ref_and_opt(tiny)
    names = []
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: names.append(type(mod).__name__))
    try:
        with torch.no_grad():
            a = ref(IDS).logits
            n_hf = len(names)
            b = opt(IDS).logits
        assert gpt2kern.fallback_reason(opt).startswith("global forward hooks")
        assert names[n_hf:] == names[:n_hf]  # the hook saw every module HF's path runs
        same(a, b)
    finally:
        h.remove()
    with torch.no_grad():
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None


def test_lm_head_with_a_bias(tiny):
    ref, opt = ref_and_opt(tiny)
    for m in (ref, opt):
        m.lm_head.bias = torch.nn.Parameter(torch.linspace(-1, 1, m.config.vocab_size), requires_grad=False)
    with torch.no_grad():
        a, b = ref(IDS).logits, opt(IDS).logits
    assert gpt2kern.fallback_reason(opt) == "lm_head is Linear with a bias, not HF's bias-free Linear"
    same(a, b)


def test_generate_engine_defers_to_hf_for_hooks_training_and_replaced_modules(tiny):
    """gpt2kern.generate runs no module forward: with hooks anywhere on the model, in training mode, or after
    lm_head was replaced, it hands the call to HF's generate (same tokens, the hooks fire)."""
    m = copy.deepcopy(tiny)
    want = m.generate(IDS, max_new_tokens=5, do_sample=False)
    calls = []
    h = m.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(gpt2kern.generate(m, IDS, max_new_tokens=5), want)
    assert gpt2kern.generate_fallback_reason() == "forward hooks on the model" and len(calls) == 5
    h.remove()
    assert torch.equal(gpt2kern.generate(m, IDS, max_new_tokens=5), want)
    assert gpt2kern.generate_fallback_reason() is None
    m.lm_head = copy.deepcopy(m.lm_head)
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # no longer tied to wte: the engine must read the new head, not the old pack
    want = m.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(gpt2kern.generate(m, IDS, max_new_tokens=5), want)
    opt = gpt2kern.optimize(copy.deepcopy(tiny))
    opt.lm_head = copy.deepcopy(m.lm_head)
    assert torch.equal(gpt2kern.generate(opt, IDS, max_new_tokens=5), want)
    assert gpt2kern.generate_fallback_reason() == "lm_head was replaced after optimize()"
    gpt2kern.generate(copy.deepcopy(tiny).train(), IDS, max_new_tokens=2)
    assert gpt2kern.generate_fallback_reason().startswith("training mode")


def test_pruned_heads_answer_is_hf(tiny):
    """transformers 5 dropped prune_heads; a model whose attention was cut by hand (fewer heads than n_embd
    implies) is still refused."""
    m = copy.deepcopy(tiny)
    attn = m.transformer.h[0].attn
    attn.num_heads -= 1
    ref, opt = ref_and_opt(m)
    a, b = outcomes((ref, opt), IDS)
    assert gpt2kern.fallback_reason(opt) == "pruned attention heads"
    same_outcome(a, b)


def test_training_mode_generate_and_grad_mode_lm_head(tiny):
    """The lm_head follows the body: after a fallback body, HF's lm_head runs too (gradients reach it)."""
    ref, opt = copy.deepcopy(tiny), gpt2kern.optimize(copy.deepcopy(tiny), freeze=False)
    out = opt(IDS, labels=IDS)
    out.loss.backward()
    assert opt.lm_head.weight.grad is not None
    same(out.logits.detach(), ref(IDS).logits.detach())


def test_gradient_checkpointing_hook_does_not_count(tiny):
    """enable_input_require_grads (gradient checkpointing, Trainer, PEFT) leaves a hook on wte that only marks the
    output as requiring grad: inference stays on the kernels."""
    _, opt = ref_and_opt(tiny)
    opt.gradient_checkpointing_enable()
    opt.gradient_checkpointing_disable()
    opt.eval()
    assert any(opt.transformer.wte._forward_hooks.values())
    with torch.no_grad():
        torch.testing.assert_close(opt(IDS).logits, tiny(IDS).logits, atol=1e-5, rtol=1e-5)
    assert gpt2kern.fallback_reason(opt) is None


def test_forward_patched_on_the_class(tiny):
    """A monkeypatch of GPT2MLP.forward (as kernel-swapping libraries do): HF's path, which runs it; unpatched,
    the kernels serve again."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    ref, opt = ref_and_opt(tiny)
    orig = GPT2MLP.forward
    with torch.no_grad():
        opt(IDS)
        GPT2MLP.forward = lambda self, x: orig(self, x) * 0.5
        try:
            a, b = ref(IDS).logits, opt(IDS).logits
            assert gpt2kern.fallback_reason(opt) == \
                "GPT2MLP.forward is patched on the class (the kernels compute the original)"
            same(a, b)
            assert torch.equal(gpt2kern.generate(opt, IDS, max_new_tokens=3),
                               ref.generate(IDS, max_new_tokens=3, do_sample=False))
        finally:
            GPT2MLP.forward = orig
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None


def test_lm_head_forward_patched_defers_generate_to_hf(tiny):
    for optimized in (False, True):
        m = copy.deepcopy(tiny)
        if optimized:
            gpt2kern.optimize(m)
        orig = m.lm_head.forward
        m.lm_head.forward = lambda x, f=orig: -f(x)
        want = m.generate(IDS, max_new_tokens=4, do_sample=False)
        assert torch.equal(gpt2kern.generate(m, IDS, max_new_tokens=4), want)
        assert gpt2kern.generate_fallback_reason() == "lm_head.forward is patched on the instance"


def test_a_submodule_in_training_mode(tiny):
    """model.eval() then one block's attention back in train(): its dropout is HF's business, for the forward
    and for gpt2kern.generate; eval() again: the kernels."""
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        opt(IDS)
        opt.transformer.h[0].attn.train()
        torch.manual_seed(0)
        b = opt(IDS).logits
        assert gpt2kern.fallback_reason(opt) == "training mode (h.0.attn)"
        ref.transformer.h[0].attn.train()
        torch.manual_seed(0)
        same(ref(IDS).logits, b)
        gpt2kern.generate(opt, IDS, max_new_tokens=2)
        assert gpt2kern.generate_fallback_reason() == "training mode (h.0.attn)"
        opt.transformer.h[0].attn.eval()
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None


def test_eps_and_max_norm_changed_after_optimize(tiny):
    ref, opt = ref_and_opt(tiny)
    with torch.no_grad():
        opt(IDS)
        for m in (ref, opt):  # one eps for every LayerNorm: repacked, still the kernels
            for mod in m.modules():
                if isinstance(mod, torch.nn.LayerNorm):
                    mod.eps = 0.5
        torch.testing.assert_close(opt(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)
        assert gpt2kern.fallback_reason(opt) is None
        assert not torch.allclose(ref(IDS).logits, tiny(IDS).logits, atol=1e-3)
        for m in (ref, opt):  # one LayerNorm apart: HF's path
            m.transformer.h[1].ln_2.eps = 1e-2
        same(ref(IDS).logits, opt(IDS).logits)
        assert gpt2kern.fallback_reason(opt).startswith("LayerNorms with different eps")
        opt.transformer.h[1].ln_2.eps = 0.5
        opt.transformer.wpe.max_norm = 0.01  # HF would renormalize (and rewrite) the rows it reads
        opt(IDS)
        assert gpt2kern.fallback_reason(opt) == "embedding with max_norm"


def test_warm_generate_never_rechecks_the_model(tiny):
    """The per-call staleness check holds through HF's greedy and beam generate and gpt2kern.generate: no module
    walk after the first call (a walk per step would cost ~0.2 ms of every decode step)."""
    _, opt = ref_and_opt(tiny)
    from gpt2kern.model import guard

    opt.generate(IDS, max_new_tokens=3, do_sample=False, num_beams=2)
    walks = []
    real = guard.Snapshot.__init__

    def counting(self, *roots):
        walks.append(1)
        real(self, *roots)
    guard.Snapshot.__init__ = counting
    try:
        opt.generate(IDS, max_new_tokens=6, do_sample=False)
        opt.generate(IDS, max_new_tokens=6, do_sample=False, num_beams=2)
        gpt2kern.generate(opt, IDS, max_new_tokens=6)
    finally:
        guard.Snapshot.__init__ = real
    assert walks == []
