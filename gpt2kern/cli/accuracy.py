"""The error of a weight mode, measured the way llama.cpp's perplexity tool reports its quantizations: on one
sequence, teacher-forced, the mode's next-token distributions against HF's fp32 ones at every position.

    relative L2 of the logits     ‖z_mode − z_fp32‖ / ‖z_fp32‖ over all positions and the vocabulary
    mean KL(p_fp32 ‖ p_mode)      llama.cpp's "mean KLD"
    top-1 agreement               llama.cpp's "same top p": the argmax is the same token
    greedy agreement              of n greedy tokens from one prompt, how many equal HF's (and where they part)

fp32 mode is exact (HF's logits to ~1e-5); the others report these figures, never silently (bench, parity).
"""
from __future__ import annotations

import copy

import torch

# The documented tolerance of each reduced mode (`gpt2kern parity --weights` fails beyond it): about 3-8x what
# random:distilgpt2 measures (bench/RESULTS.md), so a kernel or quantizer bug fails while honest rounding passes.
TOLERANCE = {
    "fp16": dict(rel_l2=0.005, mean_kld=1e-6, top1_agreement=0.98),
    "bf16": dict(rel_l2=0.04, mean_kld=1e-5, top1_agreement=0.95),
    "int8": dict(rel_l2=0.12, mean_kld=1e-4, top1_agreement=0.85),
}


def within(res: dict) -> list[tuple[str, float, float, bool]]:
    """(measure, value, limit, ok) for each toleranced measure of a mode's result."""
    out = []
    for key, lim in TOLERANCE[res["mode"]].items():
        v = res[key]
        out.append((key, v, lim, v >= lim if key == "top1_agreement" else v <= lim))
    return out


def logit_error(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """The first three measures for logits [..., V] against the reference's."""
    z0, z1 = ref_logits.double().reshape(-1, ref_logits.shape[-1]), logits.double().reshape(-1, logits.shape[-1])
    lp0, lp1 = torch.log_softmax(z0, -1), torch.log_softmax(z1, -1)
    kld = (lp0.exp() * (lp0 - lp1)).sum(-1)
    return dict(rel_l2=((z1 - z0).norm() / z0.norm()).item(), mean_kld=kld.mean().item(),
                max_kld=kld.max().item(), top1_agreement=(z0.argmax(-1) == z1.argmax(-1)).double().mean().item(),
                max_abs=(z1 - z0).abs().max().item())


def greedy_agreement(ref_tokens: torch.Tensor, tokens: torch.Tensor) -> dict:
    """n new tokens [B, n] against the reference's: how many are equal, and how many before the first difference."""
    same = ref_tokens == tokens
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else row.numel() for row in same]
    return dict(greedy_same=int(same.sum()), greedy_total=same.numel(), greedy_prefix=min(first))


@torch.no_grad()
def measure(ref, mode: str, T: int = 512, n_greedy: int = 128, seed: int = 0, model=None) -> dict:
    """A mode's error on `ref` (an HF GPT-2 LM in fp32, left untouched): teacher-forced logits of one T-token
    sequence, and n_greedy greedy tokens from its first 16 tokens, each against HF's own fp32 forward. `model`: an
    optimized copy to measure instead of making one."""
    import gpt2kern

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ref.config.vocab_size, (1, T), generator=g)
    m = model if model is not None else gpt2kern.optimize(copy.deepcopy(ref), weights=mode)
    want, got = ref(ids).logits, m(ids).logits
    res = dict(mode=mode, T=T, **logit_error(want, got))
    if n_greedy:
        prompt = ids[:, :16]
        hf = ref.generate(prompt, max_new_tokens=n_greedy, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours = gpt2kern.generate(m, prompt, max_new_tokens=n_greedy, eos_token_id=[])
        res.update(greedy_agreement(hf[:, 16:], ours[:, 16:]))
    return res
