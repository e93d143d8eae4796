"""optimize()'s weight formats side by side on one model: RSS added, prefill (all logits) and decode, interleaved.

    python bench/weights_memory.py [ISA]

fp32 in place (the default: HF's own tensors), fp32 with pack=True (a packed copy), fp16, bf16 and int8; HF eager
as the baseline. RSS deltas are the process's resident memory after gc; glibc may keep the quantizer's freed
temporaries, so a delta can exceed the copy's own bytes. ISA: avx512 | avx2 | generic (default: the best here).
"""
import copy
import gc
import sys

import torch

import gpt2kern
from gpt2kern import ops
from gpt2kern.cli.bench import Bench

FORMATS = [("fp32", {}), ("fp32-packed", dict(pack=True)), ("fp16", dict(weights="fp16")),
           ("bf16", dict(weights="bf16")), ("int8", dict(weights="int8"))]


def rss_mib() -> float:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main():
    if len(sys.argv) > 1:
        ops.set_isa(sys.argv[1])
    ref, _ = gpt2kern.load("random:distilgpt2")
    ref.eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    models = {}
    for name, kw in FORMATS:
        m = copy.deepcopy(ref)
        r0 = rss_mib()
        models[name] = gpt2kern.optimize(m, **kw)
        print(name, f"RSS added {rss_mib() - r0:.0f} MiB", flush=True)
    b = Bench(device="cpu", reps=7)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for T in (128, 512):
            ids = torch.randint(0, 50257, (1, T), generator=g)
            fns = {n: (lambda m=m: m(ids, use_cache=False)) for n, m in models.items()}
            fns["hf"] = lambda: ref(ids, use_cache=False)  # noqa: B023 (timed before ids changes)
            t = b.time(fns, reps=5)
            print(f"prefill T={T} all logits:",
                  " | ".join(f"{n} {v * 1e3:.1f}ms ({t['hf'] / v:.2f}x HF)" for n, v in t.items()), flush=True)
        prompt = torch.randint(0, 50257, (1, 16), generator=g)
        fns = {n: (lambda m=m: gpt2kern.generate(m, prompt, max_new_tokens=128, eos_token_id=[]))
               for n, m in models.items()}
        big = torch.ones(64 * 1024 * 1024)
        fns["bw"] = lambda: big.sum()
        t = b.time(fns, reps=5)
        print("decode B=1 ms/token:", " | ".join(f"{n} {v * 1e3 / 128:.2f}" for n, v in t.items() if n != "bw"),
              f"| bw {big.numel() * 4 / t['bw'] / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
