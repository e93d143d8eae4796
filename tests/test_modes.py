"""The weight modes on whole models: optimize(weights=...) and generate(weights=...) run the reduced formats on
every path (the per-op forward, the C++ body under HF's generate, gpt2kern.generate's engine), their error stays
within the documented tolerance (gpt2kern/cli/accuracy.py), switching modes repacks, edited weights are requantized,
and fp32 stays exact."""
import copy

import pytest
import torch
from conftest import LOGITS_ATOL

import gpt2kern
from gpt2kern.cli import accuracy

MODES = ["fp16", "bf16", "int8"]


@pytest.fixture(scope="module")
def ref():
    return gpt2kern.load("random:distilgpt2")[0]  # outlier channels planted in the residual stream


@pytest.mark.parametrize("mode", MODES)
def test_mode_error_within_its_tolerance_on_every_path(ref, mode):
    m = gpt2kern.optimize(copy.deepcopy(ref), weights=mode)
    assert m.transformer._gpt2kern.weights.mode == mode
    res = accuracy.measure(ref, mode, T=256, n_greedy=0, model=m)
    assert gpt2kern.fallback_reason(m) is None
    assert all(ok for *_, ok in accuracy.within(res)), res
    assert res["max_abs"] > 1e-5  # really the reduced weights, not fp32 under another name
    prompt = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    # HF's generate over the optimized model (C++ body per step) and gpt2kern's engine: the same kernels, the same
    # tokens
    assert torch.equal(m.generate(prompt, **kw), gpt2kern.generate(m, prompt, max_new_tokens=12, eos_token_id=[]))


def test_switching_modes_repacks_and_fp32_is_exact_again(ref):
    ids = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits
    m = gpt2kern.optimize(copy.deepcopy(ref))
    outs = {}
    for mode in ("fp32", "int8", "bf16", "fp32"):
        gpt2kern.optimize(m, weights=mode)
        with torch.no_grad():
            outs[mode] = m(ids).logits
        assert m.transformer._gpt2kern.weights.mode == mode
    torch.testing.assert_close(outs["fp32"], want, atol=LOGITS_ATOL, rtol=0)
    assert (outs["int8"] - want).abs().max() > 1e-4 and (outs["bf16"] - want).abs().max() > 1e-4


def test_weights_edited_after_optimize_are_requantized(ref):
    m = gpt2kern.optimize(copy.deepcopy(ref), weights="int8")
    plain = copy.deepcopy(ref)
    ids = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for model in (m, plain):
            model.transformer.h[2].mlp.c_fc.weight.mul_(-2.0)
            model.lm_head.weight[:100].zero_()
        res = accuracy.logit_error(plain(ids).logits, m(ids).logits)
    assert res["mean_kld"] < accuracy.TOLERANCE["int8"]["mean_kld"] * 5, res  # tracks the edit, not the old pack
    assert (m(ids).logits[..., :100] == 0).all()


def test_generate_weights_on_a_plain_model_leaves_it_alone(ref):
    plain = copy.deepcopy(ref)
    prompt = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(6))
    out = gpt2kern.generate(plain, prompt, max_new_tokens=8, eos_token_id=[], weights="bf16")
    assert out.shape == (1, 18) and not gpt2kern.is_optimized(plain)
    assert plain.__dict__["_gpt2kern_private_state"].mode == "bf16"
    # an int8-optimized model asked for fp32: a private fp32 pack, HF's tokens, the model keeps its int8 mode
    m = gpt2kern.optimize(copy.deepcopy(ref), weights="int8")
    fp = gpt2kern.generate(m, prompt, max_new_tokens=8, eos_token_id=[], weights="fp32")
    hf = ref.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(fp, hf) and m.transformer._gpt2kern.mode == "int8"


def test_bad_modes(ref):
    m = copy.deepcopy(ref)
    with pytest.raises(ValueError, match="weights must be one of"):
        gpt2kern.optimize(m, weights="int4")
    with pytest.raises(ValueError, match="weights must be one of"):
        gpt2kern.generate(m, torch.ones(1, 3, dtype=torch.long), weights="q8_0")
    assert not gpt2kern.is_optimized(m)


def test_tiny_model_int8_group_divides_its_width():
    """random:tiny's 32-wide layers: the int8 group shrinks to a divisor of the width (32), and runs."""
    tiny = gpt2kern.load("random:tiny")[0]
    m = gpt2kern.optimize(copy.deepcopy(tiny), weights="int8")
    assert m.transformer._gpt2kern.weights.layers[0].c_attn.fmt.group == 32
    ids = torch.randint(0, 99, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()
