import pytest
import torch

import gpt2kern
from gpt2kern.model.loading import OUTLIER_CHANNELS, random_config


def test_random_configs_are_exact():
    c = random_config("distilgpt2")
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.n_positions) == (6, 768, 12, 50257, 1024)
    assert random_config("gpt2").n_layer == 12
    assert (random_config("gpt2-medium").n_layer, random_config("gpt2-medium").n_embd) == (24, 1024)
    with pytest.raises(ValueError, match="unknown random config"):
        random_config("gpt5")


def test_random_is_seeded_and_has_outliers():
    a, tok = gpt2kern.load("random:tiny")
    b, _ = gpt2kern.load("random:tiny")
    assert tok is None and not a.training
    assert torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)
    assert a.transformer.h[1].mlp.c_proj.bias.abs().max() < 1  # 32 channels: too few to carry outliers


def test_random_distilgpt2_has_residual_outliers_and_varied_output(distil):
    t = distil.transformer
    assert len(OUTLIER_CHANNELS) >= 3
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = distil(ids, output_hidden_states=True).hidden_states
    for c in OUTLIER_CHANNELS:  # planted residual outliers, as trained GPT-2 has...
        assert hs[3][..., c].abs().min() > 500
        assert t.ln_f.weight[c] == 0.01  # ...that later LayerNorms nearly ignore
    out = gpt2kern.generate(distil, ids, max_new_tokens=8, eos_token_id=[])[:, 12:]
    assert len(set(out.flatten().tolist())) > 4  # the prompt matters: greedy is not one repeated token


def test_local_save_pretrained_dir(tmp_path):
    m, _ = gpt2kern.load("random:tiny")
    m.save_pretrained(tmp_path)
    loaded, tok = gpt2kern.load(str(tmp_path))
    assert tok is None
    ids = torch.randint(0, 98, (1, 5))
    with torch.no_grad():
        ref = m(ids).logits
        torch.testing.assert_close(gpt2kern.optimize(loaded)(ids).logits, ref, atol=1e-4, rtol=0)


def test_missing_dir_and_offline_hub(monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        gpt2kern.load("./no/such/dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="random:distilgpt2"):
        gpt2kern.load("surely-not-a-cached-model-xyz")
