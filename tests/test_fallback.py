"""Every case where the optimized model hands a call to HF's own forward: the answer is HF's, bit for bit."""
import copy

import pytest
import torch

import gpt2kern


@pytest.fixture
def models(tiny):
    ref = copy.deepcopy(tiny)
    return ref, gpt2kern.optimize(copy.deepcopy(tiny))


IDS = torch.randint(0, 98, (2, 6), generator=torch.Generator().manual_seed(0))


def test_fast_path_by_default(models):
    _, opt = models
    with torch.no_grad():
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None
    opt(IDS)  # grad enabled and parameters that require grad (optimize() leaves them so): HF's path
    assert gpt2kern.fallback_reason(opt).startswith("autograd")


def test_training_mode(models):
    ref, opt = models
    torch.manual_seed(0)
    a = ref.train()(IDS).logits
    torch.manual_seed(0)
    b = opt.train()(IDS).logits
    assert gpt2kern.fallback_reason(opt) == "training mode"
    assert torch.equal(a, b)


def test_autograd_needed(tiny):
    ref = copy.deepcopy(tiny)
    opt = gpt2kern.optimize(copy.deepcopy(tiny), freeze=False)
    out = opt(IDS, labels=IDS)
    assert gpt2kern.fallback_reason(opt).startswith("autograd")
    out.loss.backward()  # gradients flow: HF's path ran
    assert opt.transformer.wte.weight.grad is not None
    assert torch.equal(out.logits, ref(IDS).logits)
    with torch.no_grad():
        opt(IDS)
    assert gpt2kern.fallback_reason(opt) is None


@pytest.mark.parametrize("kwargs,reason", [
    (dict(output_attentions=True), "output_attentions"),
    (dict(inputs_embeds=torch.randn(2, 6, 32)), "inputs_embeds"),
])
def test_unsupported_call_features(models, kwargs, reason):
    ref, opt = models
    with torch.no_grad():
        a = ref(**({"input_ids": IDS} if "inputs_embeds" not in kwargs else {}), **kwargs)
        b = opt(**({"input_ids": IDS} if "inputs_embeds" not in kwargs else {}), **kwargs)
    assert gpt2kern.fallback_reason(opt) == reason
    assert torch.equal(a.logits, b.logits)
    if "output_attentions" in kwargs:
        assert len(b.attentions) == 2


def test_unsupported_config():
    m, _ = gpt2kern.load("random:tiny")
    m.config.activation_function = "gelu"  # the config says erf-GELU; the modules were built with gelu_new,
    opt = gpt2kern.optimize(copy.deepcopy(m))  # but the kernels refuse rather than guess
    opt(IDS)
    assert "activation_function" in gpt2kern.fallback_reason(opt)


def test_weights_changed_after_optimize_are_repacked(models):
    ref, opt = models
    with torch.no_grad():
        for m in (ref, opt):
            m.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
            m.transformer.wte.weight[5] += 1.0
        a, b = ref(IDS).logits, opt(IDS).logits
    assert gpt2kern.fallback_reason(opt) is None
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_replaced_parameter_is_noticed(models):
    ref, opt = models
    new_w = torch.nn.Parameter(torch.randn_like(ref.transformer.h[1].attn.c_proj.weight), requires_grad=False)
    for m in (ref, opt):
        m.transformer.h[1].attn.c_proj.weight = new_w
    with torch.no_grad():
        torch.testing.assert_close(opt(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)


def test_optimize_is_idempotent_and_restore(models):
    ref, opt = models
    assert gpt2kern.optimize(opt) is opt
    with torch.no_grad():
        a = opt(IDS).logits
        gpt2kern.restore(opt)
        assert not gpt2kern.is_optimized(opt)
        assert torch.equal(opt(IDS).logits, ref(IDS).logits)
    torch.testing.assert_close(a, ref(IDS).logits, atol=1e-5, rtol=1e-5)


def test_optimize_rejects_other_models():
    with pytest.raises(TypeError, match="GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel"):
        gpt2kern.optimize(torch.nn.Linear(2, 2))
