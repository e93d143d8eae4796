"""Fallback honesty, the cases tests/test_fallback.py does not cover: for every README "What runs where" case, the
optimized model's answer is HF's own (bit for bit, same dtype and device), and fallback_reason says why."""
import copy

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import gpt2kern
from gpt2kern.model import _CACHE_ARG as CACHE  # past_key_values, or cache in newer transformers

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
    """A LoRA-style wrapper around a projection: the same function, not HF's Conv1D."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.weight, self.nf = inner.weight, inner.nf

    def forward(self, x):
        return self.inner(x) + 0.0


def test_modified_attention_projection_answer_is_hf(tiny):
    m = copy.deepcopy(tiny)
    m.transformer.h[1].attn.c_attn = Wrapped(m.transformer.h[1].attn.c_attn)
    ref, opt = ref_and_opt(m)
    with torch.no_grad():
        a, b = ref(IDS).logits, opt(IDS).logits
    assert gpt2kern.fallback_reason(opt) == "modified attention projections"
    same(a, b)


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
