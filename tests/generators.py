"""Generation entry points and workloads shared by the soak and concurrency tests and scripts/soak.py.

GENERATORS maps a name to a factory: factory(optimized_model) -> gen(ids, attention_mask, max_new_tokens) ->
LongTensor of the generated tokens (greedy). Every soak/concurrency test runs over all of them, so a new entry
point (e.g. gpt2kern.generate) is one more line here.
"""
import ctypes
import ctypes.util
import gc
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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        f = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _Mallinfo2
    return f


_MALLINFO2 = _mallinfo2()


def heap_mb():
    """Bytes the C heap has handed out and not got back (glibc mallinfo2: in-use chunks + mmapped blocks), MiB;
    None where glibc is not the allocator. Unlike RSS it does not move with page reuse, so a leak of a few KiB
    per call shows over a few dozen calls."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return (m.uordblks + m.hblkhd) / 2**20


def live_tensors():
    """How many torch.Tensor objects Python holds (a leaked reference to a cache or logits tensor shows here)."""
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())  # type(): no __class__ lookups


def footprint():
    tensors = live_tensors()  # (collects garbage first, so the heap figure holds only what is alive)
    return dict(rss_mb=rss_mb(), heap_mb=heap_mb(), tensors=tensors)
