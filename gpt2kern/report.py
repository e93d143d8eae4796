"""python -m gpt2kern.report — parity and speed of gpt2kern vs HF eager / torch on one model, in one run.

Kernels are timed against their torch equivalents at distilgpt2 shapes, decode (M=1) and prefill (M=512);
end to end, prefill and greedy decode against HF eager. Timings are interleaved (ours, theirs, ours, ...),
after a warm-up, median of --reps; ratios > 1 mean gpt2kern is faster.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

import gpt2kern
from gpt2kern import ops


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def read_bandwidth(reps: int) -> float:
    x = torch.ones(64 * 1024 * 1024)  # 256 MB
    t = interleaved({"sum": lambda: x.sum()}, reps)["sum"]
    return x.numel() * 4 / t


def kernel_rows(cfg, reps):
    E, V = cfg.n_embd, cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    gelu_hf = NewGELUActivation()
    wte = torch.randn(V, E, generator=g) * 0.02
    lm_packed = ops.pack(wte.t())
    W = {n: torch.randn(k, n_, generator=g) * 0.02 for n, (k, n_) in
         {"c_attn": (E, 3 * E), "c_fc": (E, 4 * E), "mlp_proj": (4 * E, E)}.items()}
    P = {n: ops.pack(w) for n, w in W.items()}
    B_ = {n: torch.randn(w.shape[1], generator=g) for n, w in W.items()}
    lw, lb = torch.randn(E, generator=g), torch.randn(E, generator=g)
    for M in (1, 512):
        x = torch.randn(M, E, generator=g)
        r = torch.randn(M, E, generator=g)
        h = torch.randn(M, 4 * E, generator=g)
        cases = {
            "layer_norm": (lambda: ops.layer_norm(x, lw, lb, 1e-5), lambda: F.layer_norm(x, (E,), lw, lb, 1e-5), 0),
            "add_layer_norm": (lambda: ops.add_layer_norm(x, r, lw, lb, 1e-5),
                               lambda: (lambda s: (s, F.layer_norm(s, (E,), lw, lb, 1e-5)))(x + r), 0),
            "conv1d c_attn": (lambda: ops.conv1d(x, P["c_attn"], B_["c_attn"], out_features=3 * E),
                              lambda: torch.addmm(B_["c_attn"], x, W["c_attn"]), 2 * M * E * 3 * E),
            "conv1d c_fc+gelu_new": (lambda: ops.conv1d(x, P["c_fc"], B_["c_fc"], "gelu_new", out_features=4 * E),
                                     lambda: gelu_hf(torch.addmm(B_["c_fc"], x, W["c_fc"])), 2 * M * E * 4 * E),
            "conv1d mlp.c_proj+residual": (
                lambda: ops.conv1d(h, P["mlp_proj"], B_["mlp_proj"], "residual", r, E),
                lambda: torch.addmm(B_["mlp_proj"], h, W["mlp_proj"]) + r, 2 * M * E * 4 * E),
            "gelu_new": (lambda: ops.gelu_new(h), lambda: gelu_hf(h), 0),
            "lm_head": (lambda: ops.conv1d(x, lm_packed, None, out_features=V), lambda: F.linear(x, wte),
                        2 * M * E * V),
        }
        T = 512
        q = torch.randn(1, cfg.n_head, M, E // cfg.n_head, generator=g)
        k = torch.randn(1, cfg.n_head, T, E // cfg.n_head, generator=g)
        v = torch.randn_like(k)
        off = T - M
        cases["attention"] = (
            lambda: ops.attention(q, k, v, None, None, 0.125, off, True),
            (lambda: F.scaled_dot_product_attention(q, k, v)) if M == 1 else
            (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), 4 * cfg.n_head * M * T * 64 // (2 if M > 1 else 1))
        ids = torch.randint(0, V, (1, M), generator=g)
        pos = torch.arange(M)[None]
        wpe = torch.randn(cfg.n_positions, E, generator=g)
        cases["embedding"] = (lambda: ops.embedding(ids, wte, wpe, pos), lambda: wte[ids] + wpe[pos], 0)
        for name, (ours, theirs, flops) in cases.items():
            t = interleaved({"ours": ours, "torch": theirs}, reps)
            rows.append(dict(kernel=name, M=M, ours_ms=t["ours"] * 1e3, torch_ms=t["torch"] * 1e3,
                             ratio=t["torch"] / t["ours"], gflops=flops / t["ours"] / 1e9 if flops else None))
    return rows


def e2e_rows(model_name, reps, new_tokens):
    ref, _ = gpt2kern.load(model_name)
    opt = gpt2kern.optimize(copy.deepcopy(ref))
    cfg = ref.config
    g = torch.Generator().manual_seed(0)
    rows, parity = [], {}
    with torch.no_grad():
        for T in (128, 512):
            ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
            t = interleaved({"ours": lambda: opt(ids, use_cache=False), "hf": lambda: ref(ids, use_cache=False)},
                            reps)
            rows.append(dict(measure=f"prefill B=1 T={T} (all logits)", ours_ms=t["ours"] * 1e3,
                             hf_ms=t["hf"] * 1e3, ratio=t["hf"] / t["ours"]))
            parity[f"max|dlogits| T={T}"] = (opt(ids).logits - ref(ids).logits).abs().max().item()
        prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=cfg.eos_token_id)
        out = {}
        t = interleaved({"ours": lambda: out.__setitem__("ours", opt.generate(prompt, **kw)),
                         "hf": lambda: out.__setitem__("hf", ref.generate(prompt, **kw))}, max(1, reps // 2) + 2)
        rows.append(dict(measure=f"decode B=1 via model.generate ({new_tokens} tokens), ms/token",
                         ours_ms=t["ours"] * 1e3 / new_tokens, hf_ms=t["hf"] * 1e3 / new_tokens,
                         ratio=t["hf"] / t["ours"]))
        parity["greedy tokens identical"] = f"{int((out['ours'] == out['hf']).sum()) - 16}/{new_tokens}"
    params = sum(p.numel() for p in ref.parameters())
    return rows, parity, params


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpt2kern.report", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:distilgpt2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.reps < 5:
        ap.error("--reps must be >= 5 (medians of fewer runs are noise)")
    print(f"gpt2kern report — {a.model}, {torch.get_num_threads()} threads, ISA {ops.isa()}, torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}", flush=True)
    bw = read_bandwidth(a.reps)
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s", flush=True)
    cfg = gpt2kern.loading.random_config("distilgpt2")
    krows = kernel_rows(cfg, a.reps)
    print(f"\n{'kernel':28s} {'M':>4s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'GFLOP/s':>8s}")
    for r in krows:
        gf = f"{r['gflops']:8.1f}" if r["gflops"] else " " * 8
        print(f"{r['kernel']:28s} {r['M']:4d} {r['ours_ms']:9.3f} {r['torch_ms']:9.3f} {r['ratio']:6.2f} {gf}")
    erows, parity, params = e2e_rows(a.model, a.reps, a.new_tokens)
    floor_ms = (params * 4) / bw * 1e3  # every weight read once per decode step (lm_head tied to wte)
    print(f"\n{'end to end vs HF eager':55s} {'ours ms':>9s} {'HF ms':>9s} {'ratio':>6s}")
    for r in erows:
        print(f"{r['measure']:55s} {r['ours_ms']:9.2f} {r['hf_ms']:9.2f} {r['ratio']:6.2f}")
    dec = erows[-1]["ours_ms"]
    print(f"decode DRAM floor {floor_ms:.2f} ms/token ({params * 4 / 1e6:.0f} MB of weights): "
          f"{floor_ms / dec * 100:.0f}% of roofline")
    print("\nparity: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                  for k, v in parity.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=a.model, threads=torch.get_num_threads(), isa=ops.isa(), bandwidth=bw,
                           kernels=krows, end_to_end=erows, parity=parity, decode_floor_ms=floor_ms), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
