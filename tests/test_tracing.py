"""gpt2kern.tracing records the steps of every forward it wraps, or raises saying why it cannot: never an empty or
partial list in silence. A call the guard hands to HF's path (guard.CASES) has no kernel steps to record."""
import pytest
import torch
from conftest import pair

import gpt2kern

IDS = torch.tensor([[5, 17, 42]])


@pytest.fixture
def opt(tiny):
    return pair(tiny)[1]


def n_steps(model):
    return 3 + 7 * model.config.n_layer + 1  # wte, wpe, h.0.ln_1, 7 per block, ln_f, lm_head


def test_records_every_step_without_autograd(opt):
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), gpt2kern.tracing(opt) as steps:
            opt(IDS)
        names = [n for n, _ in steps]
        assert len(names) == n_steps(opt) and names[:3] == ["wte", "wpe", "h.0.ln_1"] and names[-1] == "lm_head"


def test_grad_enabled_raises_and_says_how_to_trace(opt):
    """A plain model(ids) needs autograd, so HF's path runs it: the README's old example recorded 0 steps."""
    with pytest.raises(ValueError, match=r"took HF's path \(autograd .*\): call it under torch\.no_grad\(\) or "
                                         r"torch\.inference_mode\(\)"):
        with gpt2kern.tracing(opt):
            opt(IDS)
    assert gpt2kern.fallback_reason(opt).startswith("autograd")
    assert opt(IDS).logits.requires_grad  # closed again: the same call outside tracing runs HF's path as before


@pytest.mark.parametrize("case, call, reason", [
    ("output_attentions", lambda m: m(IDS, output_attentions=True), "output_attentions"),
    ("inputs_embeds", lambda m: m(inputs_embeds=m.transformer.wte(IDS)), "inputs_embeds"),
    ("training", lambda m: m.train()(IDS), r"training mode\): call model\.eval\(\) first"),
])
def test_each_fallback_raises_with_the_guards_reason(opt, case, call, reason):
    with torch.no_grad(), pytest.raises(ValueError, match=reason):
        with gpt2kern.tracing(opt):
            call(opt)


def test_freeze_and_hf_generate_need_no_no_grad(tiny):
    opt = gpt2kern.optimize(pair(tiny)[1], freeze=True)
    with gpt2kern.tracing(opt) as steps:
        opt(IDS)
    assert len(steps) == n_steps(opt)
    with gpt2kern.tracing(opt) as steps:  # HF's generate runs under no_grad: one traced forward per token
        opt.generate(IDS, max_new_tokens=3, do_sample=False)
    assert len(steps) == 3 * n_steps(opt)


def test_gpt2kern_generate_raises(opt):
    """Its C++ engine has no per-step trace."""
    with pytest.raises(ValueError, match="engine runs none"):
        with gpt2kern.tracing(opt):
            gpt2kern.generate(opt, IDS, max_new_tokens=2)
    assert gpt2kern.generate(opt, IDS, max_new_tokens=2).shape == (1, 5)  # closed: the engine runs again


def test_nothing_recorded_raises_and_the_blocks_own_error_wins(opt):
    with pytest.raises(ValueError, match="recorded no steps"):
        with gpt2kern.tracing(opt):
            pass
    with pytest.raises(KeyError, match="mine"):
        with gpt2kern.tracing(opt):
            raise KeyError("mine")
