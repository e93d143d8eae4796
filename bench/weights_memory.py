"""optimize()'s weight formats side by side on one model: RSS added, prefill (all logits) and decode, interleaved.

    python bench/weights_memory.py [ISA]

fp32 in place (the default: HF's own tensors), fp32 with pack=True (a packed copy), fp16, bf16 and int8; HF eager
as the baseline. RSS deltas are the process's resident memory after gc; glibc may keep the quantizer's freed
temporaries, so a delta can exceed the copy's own bytes. ISA: avx512 | avx2 | generic (default: the best here).
"""
import torch, time, copy, gpt2kern, sys, os, gc
from gpt2kern import ops
from gpt2kern.cli.bench import Bench
if len(sys.argv) > 1: ops.set_isa(sys.argv[1])
ref, _ = gpt2kern.load("random:distilgpt2"); ref.eval()
ref.generation_config.eos_token_id=None; ref.generation_config.pad_token_id=0
def rss():
    gc.collect(); return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
models = {}
for name, kw in [("fp32", {}), ("fp32-packed", dict(pack=True)), ("fp16", dict(weights="fp16")), ("bf16", dict(weights="bf16")), ("int8", dict(weights="int8"))]:
    m = copy.deepcopy(ref); r0 = rss(); gpt2kern.optimize(m, **kw); models[name] = m
    print(name, "RSS added %.0f MiB" % (rss() - r0), flush=True)
b = Bench(device="cpu", reps=7)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for T in (128, 512):
        ids = torch.randint(0, 50257, (1, T), generator=g)
        fns = {n: (lambda m=m: m(ids, use_cache=False)) for n, m in models.items()}
        fns["hf"] = lambda: ref(ids, use_cache=False)
        t = b.time(fns, reps=5)
        print(f"prefill T={T} all logits:", " | ".join(f"{n} {v*1e3:.1f}ms ({t['hf']/v:.2f}x HF)" for n, v in t.items()), flush=True)
    prompt = torch.randint(0, 50257, (1, 16), generator=g)
    fns = {n: (lambda m=m: gpt2kern.generate(m, prompt, max_new_tokens=128, eos_token_id=[])) for n, m in models.items()}
    big = torch.ones(64*1024*1024)
    fns["bw"] = lambda: big.sum()
    t = b.time(fns, reps=5)
    print("decode B=1 ms/token:", " | ".join(f"{n} {v*1e3/128:.2f}" for n, v in t.items() if n != "bw"), "| bw %.0f GB/s" % (big.numel()*4/t["bw"]/1e9))
