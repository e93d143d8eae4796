"""Self-contained CUDA benchmark (bench/gpu_check.sh runs it): gpt2kern's CUDA kernels vs their torch equivalents
at distilgpt2's shapes, and end to end vs HF eager — prefill T=512, decode B=1 and B=32 through HF generate, and
the CUDA-graph decoder with and without the graph. Timing: torch.cuda.synchronize around a loop, median of >= 5.

    python bench/gpu_bench.py [--json FILE] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import gpt2kern
from gpt2kern import ops


def timeit(fn, reps=7, min_time=0.03):
    """Median seconds per call of fn (GPU work included)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    inner = max(1, min(500, int(min_time / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def kernels(dev, quick):
    from transformers.activations import NewGELUActivation
    E, H, D, FF, V = 768, 12, 64, 3072, 50257
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s):
        return torch.randn(*s, device=dev, generator=g)
    w, b = rn(E), rn(E)
    rows = []

    def add(name, ours, ref, ref_name):
        t_o, t_r = timeit(ours), timeit(ref)
        rows.append(dict(kernel=name, ours_us=t_o * 1e6, torch_us=t_r * 1e6, torch=ref_name, speedup=t_r / t_o))
        print(f"  {name:<34} ours {t_o * 1e6:9.1f} us   {ref_name:<22} {t_r * 1e6:9.1f} us   {t_r / t_o:5.2f}x",
              flush=True)

    for M in (1, 512):
        x, r = rn(M, E), rn(M, E)
        add(f"layer_norm {M}x{E}", lambda: ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (E,), w, b), "F.layer_norm")
        add(f"add_layer_norm {M}x{E}", lambda: ops.add_layer_norm(x, r, w, b),
            lambda: (x + r, F.layer_norm(x + r, (E,), w, b)), "add + F.layer_norm")
    xg = rn(512, FF)
    gelu_hf = NewGELUActivation()
    add(f"gelu_new 512x{FF}", lambda: ops.gelu_new(xg), lambda: gelu_hf(xg), "HF NewGELU")
    add(f"gelu_new 512x{FF} (vs fused)", lambda: ops.gelu_new(xg), lambda: F.gelu(xg, approximate="tanh"),
        "F.gelu(tanh)")
    shapes = [("c_attn", E, 3 * E, "none"), ("c_fc+gelu", E, FF, "gelu_new"), ("mlp.c_proj+res", FF, E, "residual"),
              ("lm_head", E, V, "none")]
    for M in ((1, 32) if quick else (1, 8, 32, 512)):
        for nm, K, N, epi in shapes:
            x, W, bb = rn(M, K), rn(K, N) * 0.02, rn(N)
            res = rn(M, N) if epi == "residual" else None
            Wp = ops.pack(W)
            ours = (lambda x=x, Wp=Wp, bb=(None if nm == "lm_head" else bb), epi=epi, res=res:
                    ops.conv1d(x, Wp, bb, epi, res))
            if epi == "gelu_new":
                ref = lambda x=x, W=W, bb=bb: gelu_hf(torch.addmm(bb, x, W))  # noqa: E731
            elif epi == "residual":
                ref = lambda x=x, W=W, bb=bb, res=res: torch.addmm(bb, x, W) + res  # noqa: E731
            elif nm == "lm_head":
                Wt = W.t().contiguous().t()  # HF's tied weight, as F.linear sees it
                ref = lambda x=x, Wt=Wt: x @ Wt  # noqa: E731
            else:
                ref = lambda x=x, W=W, bb=bb: torch.addmm(bb, x, W)  # noqa: E731
            add(f"conv1d {nm} M={M} {K}x{N}", ours, ref, "addmm (+epilogue)")
    for B, Tq, Tkv in ((1, 512, 512), (1, 1, 512), (32, 1, 512), (1, 1, 1024)):
        q, k, v = rn(B, H, Tq, D), rn(B, H, Tkv, D), rn(B, H, Tkv, D)
        causal = Tq > 1
        add(f"attention B={B} Tq={Tq} Tkv={Tkv}",
            lambda q=q, k=k, v=v, c=causal: ops.attention(q, k, v, None, None, D ** -0.5, Tkv - Tq, c),
            lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c), "SDPA")
    wte, wpe = rn(V, E), rn(1024, E)
    ids = torch.randint(0, V, (1, 512), device=dev)
    pos = torch.arange(512, device=dev)[None]
    add("embedding 1x512", lambda: ops.embedding(ids, wte, wpe, pos), lambda: wte[ids] + wpe[pos], "index + add")
    return rows


def decode_rate(gen, n_short, n_long, reps):
    """Seconds per decode step: (t(long) - t(short)) / (n_long - n_short), prefill and setup cancel out."""
    t_s = statistics.median(_time_once(lambda: gen(n_short)) for _ in range(reps))
    t_l = statistics.median(_time_once(lambda: gen(n_long)) for _ in range(reps))
    return max(t_l - t_s, 1e-9) / (n_long - n_short)


def _cut(row, start, eos):
    return next((row[: i + 1] for i in range(start, len(row)) if row[i] == eos), row)


def _time_once(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def end_to_end(dev, quick):
    from gpt2kern.cuda_graph import CudaGraphDecoder
    cpu_model, _ = gpt2kern.load("random:distilgpt2")
    ref = copy.deepcopy(cpu_model).to(dev).eval()
    opt = gpt2kern.optimize(copy.deepcopy(cpu_model).to(dev).eval())
    out = dict(model="random:distilgpt2", hf_attn_implementation=getattr(ref.config, "_attn_implementation", None))
    V = ref.config.vocab_size
    with torch.no_grad():
        ids = torch.randint(0, V, (1, 512), device=dev)
        t_hf = timeit(lambda: ref(ids), reps=5, min_time=0.05)
        t_ok = timeit(lambda: opt(ids), reps=5, min_time=0.05)
        assert gpt2kern.fallback_reason(opt) is None, gpt2kern.fallback_reason(opt)
        err = (ref(ids).logits - opt(ids).logits).abs().max().item()
        out["prefill_T512"] = dict(hf_ms=t_hf * 1e3, gpt2kern_ms=t_ok * 1e3, speedup=t_hf / t_ok, max_abs_dlogits=err)
        print(f"  prefill B=1 T=512: HF {t_hf * 1e3:.2f} ms, gpt2kern {t_ok * 1e3:.2f} ms ({t_hf / t_ok:.2f}x), "
              f"max|dlogits| {err:.2g}", flush=True)
        n_short, n_long, reps = (4, 36, 3) if quick else (8, 72, 3)
        T = 16
        for B in (1, 32):
            prompt = torch.randint(0, V, (B, T), device=dev)
            kw = dict(do_sample=False, pad_token_id=0)

            def hf_gen(n, m=ref):
                return m.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

            def ours_gen(n):
                return opt.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
            row = {}
            row["hf_ms_per_step"] = decode_rate(hf_gen, n_short, n_long, reps) * 1e3
            row["gpt2kern_hf_generate_ms_per_step"] = decode_rate(ours_gen, n_short, n_long, reps) * 1e3
            for graph in (False, True):
                dec = CudaGraphDecoder(ref, batch_size=B, max_len=T + n_long, use_graph=graph)
                key = "cuda_graph" if graph else "no_graph"
                row[f"decoder_{key}_ms_per_step"] = decode_rate(lambda n: dec.generate(prompt, n), n_short, n_long,
                                                                reps) * 1e3
                if graph:  # the decoder's greedy tokens vs HF generate's (up to each row's EOS), for the record
                    hf = ref.generate(prompt, max_new_tokens=24, **kw)
                    ours = dec.generate(prompt, 24)[:, : hf.shape[1]]
                    eos = ref.generation_config.eos_token_id
                    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
                    same = all(_cut(a, T, eos) == _cut(o, T, eos) for a, o in zip(hf.tolist(), ours.tolist()))
                    row["decoder_tokens_equal_hf_24"] = bool(same)
                del dec
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
    print("kernels (median per call):", flush=True)
    res["kernels"] = kernels(dev, a.quick)
    if a.json:  # partial results survive a timeout in the end-to-end part
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not a.skip_e2e:
        print("end to end:", flush=True)
        res["e2e"] = end_to_end(dev, a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
