"""CUDA benchmark (bench/gpu_check.sh runs it): gpt2kern's CUDA kernels vs their torch equivalents at distilgpt2's
shapes — the same kernel list as `gpt2kern bench` (gpt2kern.bench.kernel_cases) — and end to end vs HF eager:
prefill T=512, decode B=1 and B=32 through HF generate, and the CUDA-graph decoder with and without the graph.
Timing: gpt2kern.bench's Bench.time (interleaved with its baseline, synchronized, median of >= 5), as on the CPU.
Exit 1 when the CUDA-graph decoder's greedy tokens differ from HF's.

    python bench/gpu_bench.py [--json FILE] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

import gpt2kern
from gpt2kern import ops
from gpt2kern.bench import Bench, kernel_cases, sizes


def kernels(b: Bench, quick):
    cfg = gpt2kern.loading.random_config("distilgpt2")
    rows = []
    for M in sizes(cfg.n_positions, quick)[0]:
        for name, ours, theirs, flops, nbytes in kernel_cases(cfg, M, "cuda"):
            t = b.time({"ours": ours, "torch": theirs})
            rows.append(dict(kernel=name, M=M, ours_us=t["ours"] * 1e6, torch_us=t["torch"] * 1e6,
                             speedup=t["torch"] / t["ours"], gflops=flops / t["ours"] / 1e9 if flops else None,
                             GBps=nbytes / t["ours"] / 1e9))
            print(f"  {name:<28} M={M:<5} ours {t['ours'] * 1e6:9.1f} us   torch {t['torch'] * 1e6:9.1f} us   "
                  f"{t['torch'] / t['ours']:5.2f}x", flush=True)
    return rows


def decode_rates(b: Bench, gens: dict, n_short, n_long, reps) -> dict:
    """Seconds per decode step of each generator gen(n), interleaved: (t(long) - t(short)) / (n_long - n_short), so
    prefill and setup cancel out."""
    fns = {}
    for k, g in gens.items():
        fns[(k, "s")] = lambda g=g: g(n_short)
        fns[(k, "l")] = lambda g=g: g(n_long)
    t = b.time(fns, reps=reps)
    return {k: max(t[(k, "l")] - t[(k, "s")], 1e-9) / (n_long - n_short) for k in gens}


def _cut(row, start, eos):
    return next((row[: i + 1] for i in range(start, len(row)) if row[i] == eos), row)


def end_to_end(dev, quick):
    from gpt2kern.cuda_graph import CudaGraphDecoder
    cpu_model, _ = gpt2kern.load("random:distilgpt2")
    ref = copy.deepcopy(cpu_model).to(dev).eval()
    opt = gpt2kern.optimize(copy.deepcopy(cpu_model).to(dev).eval())
    out = dict(model="random:distilgpt2", hf_attn_implementation=getattr(ref.config, "_attn_implementation", None))
    V = ref.config.vocab_size
    b = Bench(device="cuda", reps=5)
    with torch.no_grad():
        ids = torch.randint(0, V, (1, 512), device=dev)
        t = b.time({"hf": lambda: ref(ids), "ours": lambda: opt(ids)})
        assert gpt2kern.fallback_reason(opt) is None, gpt2kern.fallback_reason(opt)
        err = (ref(ids).logits - opt(ids).logits).abs().max().item()
        t_hf, t_ok = t["hf"], t["ours"]
        out["prefill_T512"] = dict(hf_ms=t_hf * 1e3, gpt2kern_ms=t_ok * 1e3, speedup=t_hf / t_ok, max_abs_dlogits=err)
        print(f"  prefill B=1 T=512: HF {t_hf * 1e3:.2f} ms, gpt2kern {t_ok * 1e3:.2f} ms ({t_hf / t_ok:.2f}x), "
              f"max|dlogits| {err:.2g}", flush=True)
        n_short, n_long, reps = (4, 36, 5) if quick else (8, 72, 5)
        T = 16
        for B in (1, 32):
            prompt = torch.randint(0, V, (B, T), device=dev)
            kw = dict(do_sample=False, pad_token_id=0)
            decs = {g: CudaGraphDecoder(ref, batch_size=B, max_len=T + n_long, use_graph=g) for g in (False, True)}
            gens = {"hf": lambda n: ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw),
                    "gpt2kern_hf_generate": lambda n: opt.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw),
                    "decoder_no_graph": lambda n: decs[False].generate(prompt, n),
                    "decoder_cuda_graph": lambda n: decs[True].generate(prompt, n)}
            rates = decode_rates(b, gens, n_short, n_long, reps)
            row = {f"{k}_ms_per_step": v * 1e3 for k, v in rates.items()}
            # the decoder's greedy tokens vs HF generate's (up to each row's EOS): a mismatch fails the run
            hf = ref.generate(prompt, max_new_tokens=24, **kw)
            ours = decs[True].generate(prompt, 24)[:, : hf.shape[1]]
            eos = ref.generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            row["decoder_tokens_equal_hf_24"] = all(_cut(a, T, eos) == _cut(o, T, eos)
                                                    for a, o in zip(hf.tolist(), ours.tolist()))
            decs.clear()  # free the static caches before the next batch size
            for k in list(row):
                if k.endswith("ms_per_step") and k != "hf_ms_per_step":
                    row[k.replace("ms_per_step", "speedup")] = row["hf_ms_per_step"] / row[k]
            row["hf_tokens_per_s"] = B * 1e3 / row["hf_ms_per_step"]
            row["best_tokens_per_s"] = B * 1e3 / min(v for k, v in row.items() if k.endswith("ms_per_step"))
            out[f"decode_B{B}"] = row
            print(f"  decode B={B}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in row.items()), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not ops.has_cuda():
        print("no CUDA GPU or gpt2kern built without CUDA: nothing to benchmark")
        return 2
    dev = torch.device("cuda")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    print(f"device: {res['device']}, torch {torch.__version__}", flush=True)
    print("kernels (median per call, interleaved with torch):", flush=True)
    res["kernels"] = kernels(Bench(device="cuda", reps=7), a.quick)
    if a.json:  # partial results survive a timeout in the end-to-end part
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not a.skip_e2e:
        print("end to end:", flush=True)
        res["e2e"] = end_to_end(dev, a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    bad = [k for k, v in res.get("e2e", {}).items() if isinstance(v, dict) and v.get("decoder_tokens_equal_hf_24")
           is False]
    if bad:
        print(f"FAILED: the CUDA-graph decoder's greedy tokens differ from HF's ({', '.join(bad)})", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
