"""Generation entry points and workloads shared by the soak and concurrency tests and scripts/soak.py.

GENERATORS maps a name to a factory: factory(optimized_model) -> gen(ids, attention_mask, max_new_tokens) ->
LongTensor of the generated tokens (greedy). Every soak/concurrency test runs over all of them, so a new entry
point (e.g. gpt2kern.generate) is one more line here.
"""
import os

import torch


def _hf_generate(model):
    def gen(ids, mask, n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        return out[:, ids.shape[1]:]
    return gen


def _hf_beam(model):
    def gen(ids, mask, n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 num_beams=2, pad_token_id=0)
        return out[:, ids.shape[1]:]
    return gen


def _engine(model):
    import gpt2kern

    def gen(ids, mask, n):  # the C++ decode engine; eos off so every job produces exactly n tokens
        out = gpt2kern.generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], pad_token_id=0)
        return out[:, ids.shape[1]:]
    return gen


GENERATORS = {
    "hf_generate": _hf_generate,
    "hf_beam2": _hf_beam,
    "engine": _engine,
}


def jobs(n, vocab, seed=0, max_batch=3, max_prompt=24, max_new=12):
    """n generation jobs of varying batch size, prompt length, left padding and output length (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        B = int(torch.randint(1, max_batch + 1, (1,), generator=g))
        T = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        for b in range(1, B):  # left padding on all but the first row
            mask[b, : int(torch.randint(0, T, (1,), generator=g))] = 0
        ids = ids.masked_fill(mask == 0, 0)
        out.append((ids, mask, int(torch.randint(1, max_new + 1, (1,), generator=g))))
    return out


def rss_mb():
    """Resident set size of this process, MiB (Linux /proc; no dependency)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
