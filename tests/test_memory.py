"""What optimize() adds to memory: in fp32 it reads HF's own weights in place (the blocks' Conv1D weights and the
lm_head over the tied wte), so the process's resident memory grows by at most 5 % of the weights' bytes — measured
on the gpt2-medium config, where a packed copy would add ~1.4 GB. The reduced modes add their own packed copy:
about 1/2 (fp16, bf16) and 1/4 (int8) of the fp32 bytes."""
import copy
import gc

import pytest
import torch

import gpt2kern


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def medium():
    m, _ = gpt2kern.load("random:gpt2-medium")
    return m


def test_optimize_fp32_adds_at_most_5_percent_of_the_weights(medium):
    weight_bytes = sum(p.numel() * p.element_size() for p in medium.parameters())
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    before = rss_bytes()
    gpt2kern.optimize(medium)
    with torch.no_grad():
        medium(ids)  # the first call's packs (none in fp32) and buffers count too
    added = rss_bytes() - before
    assert gpt2kern.fallback_reason(medium) is None
    assert added <= 0.05 * weight_bytes, f"optimize() added {added / 2**20:.0f} MiB of {weight_bytes / 2**20:.0f}"
    # gpt2kern.generate on a model that is not optimized reads its weights in place too
    plain = gpt2kern.restore(medium)
    before = rss_bytes()
    gpt2kern.generate(plain, ids, max_new_tokens=2, eos_token_id=[])
    assert rss_bytes() - before <= 0.05 * weight_bytes


@pytest.mark.parametrize("mode,fraction", [("fp16", 0.5), ("bf16", 0.5), ("int8", 0.25 * (1 + 4 / 64))])
def test_reduced_modes_hold_their_fraction_of_the_fp32_bytes(mode, fraction):
    ref, _ = gpt2kern.load("random:distilgpt2")
    m = gpt2kern.optimize(copy.deepcopy(ref), weights=mode)
    W = m.transformer._gpt2kern.weights
    lins = [lin for L in W.layers for lin in (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)] + [W.lm_head]
    held = sum(lin.data.numel() * lin.data.element_size() + (lin.scales.numel() * 4 if lin.scales is not None else 0)
               for lin in lins)
    fp32 = sum(lin.n_in * lin.n_out * 4 for lin in lins)
    assert held == W.nbytes
    # panels pad the columns to a multiple of 32 (the lm_head's 50257 -> 50272): within 0.1 %
    assert abs(held / fp32 - fraction) < 1e-3 * fraction + 1e-9, (held / fp32, fraction)
