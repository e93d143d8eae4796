import pytest
import torch

import gpt2kern
from gpt2kern.loading import OUTLIER_CHANNELS, random_config


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
    bias = a.transformer.h[1].mlp.c_proj.bias
    assert bias.abs().max() > 500  # planted residual outliers, as trained GPT-2 has
    assert len(OUTLIER_CHANNELS) >= 3


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
