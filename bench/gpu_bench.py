"""CUDA benchmark (bench/gpu_check.sh runs it): gpt2kern's CUDA kernels vs their torch equivalents at distilgpt2's
shapes — the same kernel list as `gpt2kern bench` (gpt2kern.cli.bench.kernel_cases) —, the decode GEMV's numbered
variants against each other (v2/v3/v4: a table and the winner per shape), the prefill GEMM's (v2 fp32 FMAs, v3
3xTF32 tensor cores, with cuBLAS fp32 as context), the prefill attention's (v1 the general kernel, v2
FlashAttention-2 style, with torch's SDPA fp32 as context),
and end to end vs HF as from_pretrained gives it (sdpa attention) and vs HF eager (the parity reference): prefill
T=512, decode B=1 and B=32 through HF generate and through CudaGraphDecoder
(without the graph, and with it for every gemv, kv_write and launch variant that can run), with the kernels launched
per decode token (graph nodes);
and the reduced weight modes' conv1d (fp16, bf16, int8 [in, out] on CUDA, csrc/cuda/matmul_lowp.cu) against
fp32 at decode and prefill shapes, with the decode GEMV variant 2 over their [out, in] copies (ops.matmul_nk) beside
it at decode rows, one table (time, speedup over fp32, weight GB/s, error vs float64 of the stored weights).
Timing: gpt2kern.bench's Bench.time (interleaved with its baseline, synchronized, median of >= 5), as on the CPU.
Exit 1 when any decoder's greedy tokens differ from HF's, or a variant's or weight mode's result is off its float64
reference.

    python bench/gpu_bench.py [--json FILE] [--quick] [--skip-e2e] [--variants-out FILE]
With --variants-out, the fastest decoder variants with HF's tokens per batch size are written as
gpt2kern/decode/cuda_variants.json plus this GPU's entry (commit that file to make them CudaGraphDecoder's defaults).

    python bench/gpu_bench.py --sizes [--deadline-s S] [--json FILE] [--table-out FILE.md] [--variants-out FILE]
Instead of the above (bench/gpu_check.sh's gpu_sizes step): GPT-2 at its sizes against HF on this GPU, issue #28's
measures, side by side in one process, interleaved (Bench.time, median of 5). Random weights with the exact configs of
gpt2 / gpt2-medium / gpt2-xl, drawn on the GPU (the speed does not depend on the values). In order of value, with the
seconds each takes on an H200 by the 2026-12-04 side-by-side run's numbers (HF sdpa / ours: prefill T=1024 gpt2
10.0 / 27.8 ms, medium 24.1 / 61.5, xl 95.5 / 244; decode ms/token gpt2 5.15 / 0.93, medium 9.20 / 2.13, xl
19.3 / 6.52; HF static cache + compile 2.43 with a 15 s compile; 4.2 TB/s copy bandwidth):
  start-up (imports, CUDA, variant probe)                                                                  ~10 s
  copy bandwidth (read + write of a 2 GiB buffer, for the decode floor)                                     ~1 s
  prefill T=1024 B=1 all logits fp32, gpt2 / medium / xl: HF sdpa vs optimize() under every prefill GEMM /
    attention variant pair ops.cuda_variant accepts (probed 1..9; the knobs restored after), max |dlogits| vs
    HF eager (> 1e-4 fails the run); the pair fastest over the sizes with HF's logits is this GPU's prefill
    default (--variants-out)                              (6 rounds x (HF + 4 pairs), model set-up)  ~3 / 4 / 11 s
  decode B=1 fp32 gpt2: every CUDA-graph decoder variant set (gemv x kv_write x launch that can run: 10) vs HF
    sdpa generate, tokens vs HF eager (a mismatch fails the run), kernels per token, floor = params x 4 B / copy
    bandwidth (6 rounds of 8 and 24 tokens: 16 steps apart)                                                ~5 s
  decode B=1 fp32 gpt2-xl: the default decoder and gpt2's fastest only (all ten: ~20 s more)                ~8 s
  decode B=32 gpt2: tokens/s, every decoder set vs HF sdpa generate                                         ~7 s
  prefill T=1024 weights="bf16" vs HF in bfloat16, gpt2                                                     ~1 s
  decode B=1 gpt2-xl with fp32 / bf16 / fp16 / int8 weights (tokens vs HF reported, not required)           ~8 s
  decode B=1 gpt2 vs HF static cache + torch.compile (generation_config.cache_implementation="static",
    model.forward = torch.compile(..., mode="reduce-overhead", fullgraph=True): HF's documented recipe), in a
    child process so that a compile that hangs or fails costs this row only (optional: not a failure)     ~27 s
  extras, only with time left: decode B=1 gpt2-medium; bf16 prefill of medium and xl                     ~10 s
  about 95 s in all; gpu_check gives the step 93 s and --deadline-s 81 (its CUDA tests come first), so the last
  parts may wait for a second call on the warm machine (--deadline-s 240 measures them all). Each part starts only
when its estimate (~1.5x the above; the compile 40 s, given at most 90) fits before the deadline (counted from this
process's start), else it is recorded as "not measured (time)"; the xl decode is sized down (two decoders) and the
extras come last, so a slow GPU loses the extras first. Results are saved after every part (--json, --table-out): a
step killed later keeps them. Exit 1 when an fp32 decoder's tokens differ from HF's, a prefill variant is off HF
eager by more than 1e-4, or a part raised (except HF's compiled path); targets not met and parts not measured do not
fail it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import gpt2kern
import gpt2kern.model.loading
from gpt2kern import ops
from gpt2kern.cli.bench import Bench, kernel_cases
from gpt2kern.cli.bench import sizes as kernel_sizes


def kernels(b: Bench, quick):
    cfg = gpt2kern.model.loading.random_config("distilgpt2")
    rows = []
    for M in kernel_sizes(cfg.n_positions, quick)[0]:
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


VARIANT_TOL = 1e-4  # max |variant - float64 reference| that still counts as a result (fp32 over K <= 3072)
NUMBERED = ("v1", "v2", "v3", "v4")  # gpt2kern's variants (torch's: context)


def _winners(rows, kernel):
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        ok = [r for r in rs if r["max_abs_err"] <= VARIANT_TOL]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        out.append(dict(kernel=kernel, shape=shape, winner=best["variant"] if best else "none (all off reference)",
                        times_us=", ".join(f"{r['variant']} {r['us']:.1f}" for r in rs)))
    return out


def variants(quick):
    """The decode GEMV's numbered variants at distilgpt2's matmul shapes vs a float64 reference, timed with torch's
    addmm as context; rows and the winner per shape."""
    b = Bench(device="cuda", reps=7)
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    kernel, rows = "decode_gemv", []
    for M in (1, 32) if quick else (1, 8, 32):
        for K, N in ((768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)):
            x = torch.randn(M, K, generator=g).to(dev)
            w = (torch.randn(K, N, generator=g) * 0.05).to(dev)
            wt = w.t().contiguous()
            bias = torch.randn(N, generator=g).to(dev)
            counters = torch.zeros((N + 31) // 32, dtype=torch.int32, device=dev)
            ref = x.double() @ w.double() + bias.double()
            # v2 matmul_nk on [N, K]; v3 conv1d's split-K GEMV on [K, N] with x staged in shared memory; v4 v3 with
            # the split-K partials summed by each column group's last block
            fns = {"v2": lambda: ops.matmul_nk(x, wt, bias), "v3": lambda: ops.matmul_decode(x, w, bias),
                   "v4": lambda: ops.matmul_decode(x, w, bias, counters=counters),
                   "torch": lambda: torch.addmm(bias, x, w)}
            t = b.time(fns)
            for name, f in fns.items():
                err = (f().double() - ref).abs().max().item()
                rows.append(dict(kernel=kernel, variant=name, shape=f"M={M} K={K} N={N}", us=t[name] * 1e6,
                                 max_abs_err=err))
            del ref
    print(f"  {kernel}:", flush=True)
    for r in rows:
        flag = "" if r["max_abs_err"] <= VARIANT_TOL else "   OFF REFERENCE"
        print(f"    {r['shape']:<30} {r['variant']:<15} {r['us']:9.1f} us  max|err| {r['max_abs_err']:.2g}{flag}",
              flush=True)
    winners = _winners([r for r in rows if r["variant"] in NUMBERED], kernel)  # (torch's addmm is context)
    for w in winners:
        print(f"    winner {w['shape']:<30} {w['winner']}", flush=True)
    return rows, winners


def prefill_gemm(quick):
    """The prefill GEMM's numbered variants (ops.cuda_variant('prefill_gemm'): v2 fp32 FMAs, v3 3xTF32 on tensor
    cores) at GPT-2's prefill shapes vs a float64 reference, torch's addmm (cuBLAS fp32: TF32 off) as context;
    rows (with TFLOP/s) and the winner per shape."""
    b = Bench(device="cuda", reps=7)
    g = torch.Generator(device="cpu").manual_seed(1)
    kernel, rows = "prefill_gemm", []
    before = ops.cuda_variant("prefill_gemm")
    # gpt2's c_attn, attn/mlp c_proj and c_fc, medium's c_fc, xl's c_fc and c_proj, the lm_head
    kn = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1024, 4096), (1600, 6400), (6400, 1600),
          (768, 50257)]
    try:
        for M in (128, 1024) if quick else (128, 512, 1024):
            for K, N in kn if not quick else [s for s in kn if s[1] != 768 or s[0] == 3072]:
                x = torch.randn(M, K, generator=g).cuda()
                w = (torch.randn(K, N, generator=g) * 0.05).cuda()
                bias = torch.randn(N, generator=g).cuda()
                ref = torch.addmm(bias.double(), x.double(), w.double())

                def run(v):
                    ops.cuda_variant("prefill_gemm", v)
                    return ops.matmul_prefill(x, w, bias)

                fns = {"v2": lambda: run(2), "v3": lambda: run(3), "torch": lambda: torch.addmm(bias, x, w)}
                t = b.time(fns)
                for name, f in fns.items():
                    err = (f().double() - ref).abs().max().item()
                    rows.append(dict(kernel=kernel, variant=name, shape=f"M={M} K={K} N={N}", us=t[name] * 1e6,
                                     tflops=2 * M * K * N / t[name] / 1e12, max_abs_err=err))
                if (K, N) in ((768, 2304), (768, 3072), (1600, 6400), (768, 50257)):
                    # bf16 weights: v2 the mode's SIMT tiles, v3 its tensor-core GEMM (matmul_3xbf16.cu); torch's
                    # bf16 addmm (bf16 activations too: less accurate) as context
                    from gpt2kern.kernels.weights import WeightFormat
                    fmt = WeightFormat("kn", "bf16", K, N, 0)
                    d, sc = fmt.make(w)
                    ref16 = torch.addmm(bias.double(), x.double(), fmt.unpack(d, sc).double())
                    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()

                    def run16(v):
                        ops.cuda_variant("prefill_gemm", v)
                        return ops.conv1d(x, d, bias, scales=sc)

                    fns = {"v2": lambda: run16(2), "v3": lambda: run16(3),
                           "torch_bf16": lambda: torch.addmm(bb, xb, wb)}
                    t = b.time(fns)
                    for name, f in fns.items():
                        err = (f().double() - ref16).abs().max().item()
                        rows.append(dict(kernel="prefill_gemm_bf16", variant=name, shape=f"M={M} K={K} N={N}",
                                         us=t[name] * 1e6, tflops=2 * M * K * N / t[name] / 1e12, max_abs_err=err))
                    del ref16
                del ref
    finally:
        ops.cuda_variant("prefill_gemm", before)
    print(f"  {kernel} (fp32 weights; prefill_gemm_bf16: bf16 weights):", flush=True)
    for r in rows:
        flag = "" if r["max_abs_err"] <= VARIANT_TOL else "   OFF REFERENCE"
        print(f"    {r['kernel']:<18} {r['shape']:<26} {r['variant']:<10} {r['us']:9.1f} us {r['tflops']:6.1f} "
              f"TFLOP/s  max|err| {r['max_abs_err']:.2g}{flag}", flush=True)
    winners = [w for k in (kernel, "prefill_gemm_bf16")
               for w in _winners([r for r in rows if r["variant"] in NUMBERED and r["kernel"] == k], k)]
    for w in winners:
        print(f"    winner {w['shape']:<30} {w['winner']}", flush=True)
    return rows, winners


def attention_variants():
    """The prefill attention's numbered variants (ops.cuda_variant("prefill_attention"): v1 the general kernel, v2
    FlashAttention-2 style) at GPT-2 shapes, causal from position 0 as the model's prefill calls it, vs a float64
    reference, with torch's SDPA (fp32) as context; rows and the winner per shape. The variant knob is set inside
    each timed call (a host call, the same for both) and restored at the end."""
    import torch.nn.functional as F
    b = Bench(device="cuda", reps=7)
    g = torch.Generator(device="cpu").manual_seed(0)
    kernel, rows, D = "prefill_attention", [], 64
    before = ops.cuda_variant("prefill_attention")

    def run(v, q, k, v_, scale):
        ops.cuda_variant("prefill_attention", v)
        return ops.attention(q, k, v_, None, None, scale, 0, True)

    try:
        for H, T in ((12, 128), (12, 512), (12, 1024), (25, 1024)):
            q, k, v = (torch.randn(1, H, T, D, generator=g).cuda() for _ in range(3))
            scale = D ** -0.5
            s = (q.double() @ k.double().transpose(-1, -2)) * scale
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            ref = (torch.softmax(s, -1) @ v.double()).transpose(1, 2)  # [1, T, H, D], the op's layout
            del s
            fns = {"v1": lambda: run(1, q, k, v, scale), "v2": lambda: run(2, q, k, v, scale),
                   "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)}
            t = b.time(fns)
            for name, f in fns.items():
                out = f()
                if name == "torch":
                    out = out.transpose(1, 2)
                err = (out.double() - ref).abs().max().item()
                rows.append(dict(kernel=kernel, variant=name, shape=f"B=1 H={H} T={T} D={D}", us=t[name] * 1e6,
                                 max_abs_err=err))
            del ref
    finally:
        ops.cuda_variant("prefill_attention", before)
    print(f"  {kernel} (causal, torch = SDPA fp32 as context):", flush=True)
    for r in rows:
        flag = "" if r["max_abs_err"] <= VARIANT_TOL else "   OFF REFERENCE"
        print(f"    {r['shape']:<30} {r['variant']:<15} {r['us']:9.1f} us  max|err| {r['max_abs_err']:.2g}{flag}",
              flush=True)
    winners = _winners([r for r in rows if r["variant"] in NUMBERED], kernel)
    for w in winners:
        print(f"    winner {w['shape']:<30} {w['winner']}", flush=True)
    return rows, winners


LOWP_TOL = 1e-4  # max |conv1d - float64 of the stored weights| / max |reference| that still counts as a result


LOWP_KERNELS = {"conv1d": "conv1d: [in, out]; decode rows: the lane-per-column GEMV (4-byte loads)",
                "nk_v2": "ops.matmul_nk, decode GEMV variant 2: [out, in] copies, a warp per column, 16-byte loads"}


def lowp(quick):
    """conv1d with fp32 / fp16 / bf16 / int8 weights ([in, out] on CUDA) at decode rows (the GEMV) and prefill rows
    (the tiled GEMM), and at decode rows the decode GEMV variant 2 (ops.matmul_nk over each mode's [out, in] copy,
    CudaGraphDecoder gemv=2) beside them, interleaved per shape; one row per shape, mode and kernel (LOWP_KERNELS).
    The gpt2-xl shapes (K or N = 1600, 6400) at one row: the decode step's matrices."""
    from gpt2kern.kernels.weights import WeightFormat, int8_group
    b = Bench(device="cuda", reps=7)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    print(f"  {'shape':<26} {'mode':<5} {'kernel':<7} {'us':>9} {'x fp32':>7} {'GB/s':>7} {'rel err':>9}", flush=True)
    small = ((768, 2304), (768, 3072), (3072, 768), (768, 50257))
    xl = ((1600, 4800), (1600, 6400), (6400, 1600), (1600, 50257))
    for M in ((1, 32, 512) if quick else (1, 8, 32, 128, 512)):
        for K, N in small + (xl if M == 1 else ()):
            x = torch.randn(M, K, generator=g).cuda()
            w = (torch.randn(K, N, generator=g) * 0.05).cuda()
            bias = torch.randn(N, generator=g).cuda()
            stored, fns = {}, {}
            for mode in ("fp32", "fp16", "bf16", "int8"):
                fmt = WeightFormat("kn", mode, K, N, int8_group(K) if mode == "int8" else 0)
                d, sc = fmt.make(w)
                stored[mode, "conv1d"] = (fmt, d, sc)
                fns[mode, "conv1d"] = lambda d=d, sc=sc: ops.conv1d(x, d, bias, scales=sc)
                if M <= ops.GEMV_MAX_ROWS:  # variant 2 over the same stored values, [out, in]
                    fn, dn, sn = fmt.nk_copy(d, sc)
                    stored[mode, "nk_v2"] = (fn, dn, sn)
                    fns[mode, "nk_v2"] = lambda dn=dn, sn=sn: ops.matmul_nk(x, dn, bias, scales=sn)
            t = b.time(fns)
            ref = None
            for (mode, kern), (fmt, d, sc) in stored.items():
                ref = x.double() @ fmt.unpack(d, sc) + bias.double()  # (the nk copy: the same values)
                err = ((fns[mode, kern]().double() - ref).abs().max() / ref.abs().max()).item()
                us = t[mode, kern]
                r = dict(kernel="conv1d_weights", variant=kern, mode=mode, shape=f"M={M} K={K} N={N}", us=us * 1e6,
                         speedup_vs_fp32=t["fp32", "conv1d"] / us, weight_GBps=fmt.nbytes / us / 1e9, rel_err=err)
                rows.append(r)
                flag = "" if err <= LOWP_TOL else "   OFF REFERENCE"
                print(f"  {r['shape']:<26} {mode:<5} {kern:<7} {r['us']:9.1f} {r['speedup_vs_fp32']:7.2f} "
                      f"{r['weight_GBps']:7.0f} {err:9.2g}{flag}", flush=True)
            del ref, stored, fns
    return rows


def end_to_end(dev, quick):
    from gpt2kern.decode import cuda_graph
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    cpu_model, _ = gpt2kern.load("random:distilgpt2")
    ref = copy.deepcopy(cpu_model).to(dev).eval()  # HF eager: the parity reference
    opt = gpt2kern.optimize(copy.deepcopy(cpu_model).to(dev).eval())
    # the speed baseline is HF as from_pretrained gives it (sdpa attention); eager is the second column
    hf_model = copy.deepcopy(ref)
    hf_model.set_attn_implementation("sdpa")
    out = dict(model="random:distilgpt2", hf_attn_implementation="sdpa", hf_second_attn_implementation="eager")
    V = ref.config.vocab_size
    b = Bench(device="cuda", reps=5)
    launches = {}
    with torch.no_grad():
        ids = torch.randint(0, V, (1, 512), device=dev)
        t = b.time({"hf": lambda: hf_model(ids), "hf_eager": lambda: ref(ids), "ours": lambda: opt(ids)})
        assert gpt2kern.fallback_reason(opt) is None, gpt2kern.fallback_reason(opt)
        err = (ref(ids).logits - opt(ids).logits).abs().max().item()
        t_hf, t_eager, t_ok = t["hf"], t["hf_eager"], t["ours"]
        out["prefill_T512"] = dict(hf_ms=t_hf * 1e3, hf_eager_ms=t_eager * 1e3, gpt2kern_ms=t_ok * 1e3,
                                   speedup=t_hf / t_ok, speedup_vs_eager=t_eager / t_ok, max_abs_dlogits=err)
        print(f"  prefill B=1 T=512: HF sdpa {t_hf * 1e3:.2f} ms, HF eager {t_eager * 1e3:.2f} ms, gpt2kern "
              f"{t_ok * 1e3:.2f} ms ({t_hf / t_ok:.2f}x sdpa, {t_eager / t_ok:.2f}x eager), max|dlogits| {err:.2g}",
              flush=True)
        n_short, n_long, reps = (4, 36, 5) if quick else (8, 72, 5)
        T = 16
        for B in (1, 32):
            prompt = torch.randint(0, V, (B, T), device=dev)
            kw = dict(do_sample=False, pad_token_id=0)
            # the same step without the graph (explicit variants: the table's defaults must not change the rows), and
            # the graph with every gemv and kv_write pair that can run (cuda_graph.refusals: the decoder's rules)
            eager = dict(gemv=2, kv_write=2, launch=1) if B == 1 else dict(gemv=3, kv_write=3, launch=1)
            decs = {"decoder_no_graph": CudaGraphDecoder(ref, batch_size=B, max_len=T + n_long, use_graph=False,
                                                         **eager)}
            major, minor = torch.cuda.get_device_capability()
            V_ = cuda_graph.VARIANTS
            for v in (dict(gemv=gv, kv_write=kw_, launch=la) for gv in V_["gemv"] for kw_ in V_["kv_write"]
                      for la in V_["launch"]):
                if cuda_graph.refusals(v, B, sm=10 * major + minor):
                    continue
                name = f"decoder_cuda_graph_gemv{v['gemv']}_kvwrite{v['kv_write']}" + ("_pdl" if v["launch"] == 2
                                                                                       else "")
                decs[name] = CudaGraphDecoder(ref, batch_size=B, max_len=T + n_long, **v)
                launches[f"B={B} gemv v{v['gemv']} kv_write v{v['kv_write']} launch v{v['launch']}"] = \
                    decs[name].launches_per_token
            gens = {"hf": lambda n: hf_model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw),
                    "hf_eager": lambda n: ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw),
                    "gpt2kern_hf_generate": lambda n: opt.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)}
            for name, d in decs.items():
                gens[name] = lambda n, d=d: d.generate(prompt, n)
            rates = decode_rates(b, gens, n_short, n_long, reps)
            row = {f"{k}_ms_per_step": v * 1e3 for k, v in rates.items()}
            # every decoder's greedy tokens vs HF generate's (up to each row's EOS): a mismatch fails the run
            hf = ref.generate(prompt, max_new_tokens=24, **kw)
            eos = ref.generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            eq = {}
            for name, d in decs.items():
                ours = d.generate(prompt, 24)[:, : hf.shape[1]]
                eq[name] = all(_cut(a, T, eos) == _cut(o, T, eos) for a, o in zip(hf.tolist(), ours.tolist()))
            row["tokens_equal_hf_by_decoder"] = eq
            row["tokens_equal_hf"] = all(eq.values())
            row["decoder_variants"] = {name: d.variants for name, d in decs.items() if d.graph is not None}
            # where the fastest graph decoders' step time goes, per launch variant (plain, programmatic)
            for la in cuda_graph.VARIANTS["launch"]:
                mine = [n for n, d in decs.items() if d.graph is not None and d.variants["launch"] == la
                        and n in rates]
                if mine:
                    best = min(mine, key=lambda n: row[f"{n}_ms_per_step"])
                    a = step_anatomy(decs[best], prompt)
                    row.setdefault("anatomy", {})[best] = a
                    print(f"  decode B={B} {best}: {anatomy_line(a)}", flush=True)
            decs.clear()  # free the static caches before the next batch size
            ours_ms = {k: v for k, v in row.items() if k.endswith("ms_per_step") and not k.startswith("hf")}
            for k, v in ours_ms.items():
                row[k.replace("ms_per_step", "speedup")] = row["hf_ms_per_step"] / v
                row[k.replace("ms_per_step", "speedup_vs_eager")] = row["hf_eager_ms_per_step"] / v
            row["hf_tokens_per_s"] = B * 1e3 / row["hf_ms_per_step"]
            row["best_tokens_per_s"] = B * 1e3 / min(ours_ms.values())
            out[f"decode_B{B}"] = row
            print(f"  decode B={B}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in row.items()), flush=True)
    for k, v in launches.items():
        print(f"  kernels per decode token in the graph ({k}): {v}", flush=True)
    return out, launches


def kernel_summary(kernels, steps: int, top: int = 6) -> dict:
    """Kernels [(name, start_us, end_us)] recorded over `steps` decode steps -> per step: kernels launched, the GPU's
    busy time (their durations summed) and the span from the first start to the last end (busy / span: how much of
    the step the GPU computes rather than waits between kernels), and the `top` kernels by total time (names cut at
    their argument list)."""
    if not kernels or steps < 1:
        return dict(kernels_per_step=0, busy_us_per_step=0.0, span_us_per_step=0.0, busy_fraction=None, top=[])
    busy = sum(e - s for _, s, e in kernels)
    span = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    by = {}
    for n, s, e in kernels:
        k = n.split("(")[0]
        by[k] = by.get(k, 0.0) + (e - s)
    order = sorted(by.items(), key=lambda kv: -kv[1])[:top]
    return dict(kernels_per_step=len(kernels) / steps, busy_us_per_step=busy / steps, span_us_per_step=span / steps,
                busy_fraction=busy / span if span > 0 else None,
                top=[dict(kernel=k, us_per_step=t / steps) for k, t in order])


def step_anatomy(dec, prompt, steps: int = 16) -> dict:
    """kernel_summary of `steps` greedy steps of decoder `dec` after `prompt`, from torch's profiler (CUPTI records
    the kernels a graph replay launches; the argmax between steps is one of them). {"error": ...} if the profiler
    cannot record them here."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        nxt = dec.prefill(prompt).argmax(-1)
        nxt = dec.step(nxt).argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                nxt = dec.step(nxt).argmax(-1)
            torch.cuda.synchronize()
        ks = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
              if e.device_type == DeviceType.CUDA]
        return kernel_summary(ks, steps)
    except Exception as e:  # a profiler that cannot see graph kernels must not cost the bench
        return dict(error=f"{type(e).__name__}: {e}")


def anatomy_line(a: dict) -> str:
    if "error" in a:
        return f"no kernel profile ({a['error']})"
    frac = a["busy_fraction"]
    top = ", ".join(f"{t['kernel']} {t['us_per_step']:.1f}" for t in a["top"])
    return (f"{a['kernels_per_step']:.0f} kernels/step, GPU busy {a['busy_us_per_step']:.1f} of a "
            f"{a['span_us_per_step']:.1f} us span ({frac:.0%}); top (us/step): {top}" if frac is not None else
            "no kernels recorded")


def pick_defaults(e2e: dict) -> dict:
    """Per measured batch size, the variants of the fastest CUDA-graph decoder whose greedy tokens equal HF's:
    {"1": {"gemv": g, "kv_write": k}, "32": ...} (cuda_graph.default_variants reads them)."""
    by_batch = {}
    for key, row in e2e.items():
        if not (key.startswith("decode_B") and isinstance(row, dict)):
            continue
        ok = row.get("tokens_equal_hf_by_decoder", {})
        cands = [(row[f"{n}_ms_per_step"], n) for n in row.get("decoder_variants", {})
                 if ok.get(n) and f"{n}_ms_per_step" in row]
        if cands:
            by_batch[key[len("decode_B"):]] = dict(row["decoder_variants"][min(cands)[1]])
    return by_batch


def write_variant_table(path: str, gpu: str, by_batch: dict | None, how: str, prefill: dict | None = None,
                        base: str | None = None) -> dict:
    """The packaged gpt2kern/decode/cuda_variants.json (or the table at `base`) with this GPU's entry updated and
    written to `path`: by_batch (the decoder's variants) replaced when given, else kept; prefill (the prefill knobs'
    winners, gpu_bench.py --sizes) set when given, else kept."""
    from gpt2kern.decode import cuda_graph
    with open(base or cuda_graph.TABLE) as f:
        table = json.load(f)
    entry = dict(table["gpus"].get(gpu) or {})
    entry.setdefault("by_batch", {})
    if by_batch is not None:
        entry.update(measured=how, by_batch=by_batch)
    if prefill is not None:
        entry.update(prefill=prefill, prefill_measured=how)
    table["gpus"][gpu] = entry
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return table


# ---------------------------------------------------------------- --sizes: GPT-2 sizes side by side (issue #28)

SIZES = ("gpt2", "gpt2-medium", "gpt2-xl")
PARITY_TOL = 1e-4  # max |logits - HF eager fp32| of an fp32 prefill: the parity contract
PREFILL_T = 1024  # prefill prompt length (n_positions of every GPT-2 size)
PROMPT_T = 16  # decode prompt length
DECODE_N = (8, 24)  # new tokens of the short and the long timed generate (their difference: 16 decode steps)
TOKENS_N = 24  # greedy tokens compared with HF eager's
NOT_MEASURED = "not measured (time)"
REDUCED = ("bf16", "fp16", "int8")


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the step's limit counts the imports too."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return max(0.0, up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Deadline:
    """`seconds` from `age` seconds ago (None: no deadline); allows(est) says whether est seconds are left."""

    def __init__(self, seconds: float | None, age: float = 0.0, clock=time.monotonic):
        self.clock = clock
        self.end = math.inf if seconds is None else clock() + seconds - age

    def left(self) -> float:
        return self.end - self.clock()

    def allows(self, est_s: float) -> bool:
        return self.left() >= est_s


class SizesRun:
    """The --sizes parts, run in order while the deadline allows each one's estimate: res[key] is a part's dict,
    res["parts"][key] its status ('ok', NOT_MEASURED, 'error: ...'), res["part_s"][key] its seconds; `save(res)`
    after every part, so a step killed later keeps what was measured."""

    def __init__(self, deadline: Deadline, save=None):
        self.deadline, self.save = deadline, save
        self.res = dict(parts={}, part_s={}, optional_parts=[])

    def part(self, key: str, est_s: float, fn, optional: bool = False):
        parts = self.res["parts"]
        if optional:  # an error here is reported, not a failure (HF's own path)
            self.res["optional_parts"].append(key)
        if not self.deadline.allows(est_s):
            parts[key] = NOT_MEASURED
            print(f"  {key}: {NOT_MEASURED}: {self.deadline.left():.0f}s left, needs ~{est_s:.0f}s", flush=True)
        else:
            t0 = time.monotonic()
            print(f"  {key} ({self.deadline.left():.0f}s left, ~{est_s:.0f}s) ...", flush=True)
            try:
                self.res[key] = fn()
                parts[key] = "ok"
            except Exception as e:  # one part's error is recorded; the others still run
                traceback.print_exc()
                parts[key] = f"error: {type(e).__name__}: {e}"[:400]
            self.res["part_s"][key] = round(time.monotonic() - t0, 1)
            print(f"  {key}: {parts[key]} in {self.res['part_s'][key]}s", flush=True)
        gc.collect()
        with contextlib.suppress(Exception):  # (a part's CUDA error may make this raise too: keep going)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.save is not None:
            self.save(self.res)
        return self.res.get(key)


# ---- the prefill variant knobs (ops.cuda_variant: process-wide)

def knob_choices() -> dict:
    """Every variant each prefill knob accepts (probed 1..9), the knobs left as they were."""
    out = {}
    for name in ops.CUDA_VARIANTS:
        now = ops.cuda_variant(name)
        vals = []
        for v in range(1, 10):
            try:
                ops.cuda_variant(name, v)
                vals.append(v)
            except ValueError:
                pass
        ops.cuda_variant(name, now)
        out[name] = vals
    return out


def knob_pairs(choices: dict) -> list:
    names = list(choices)
    return [dict(zip(names, vs)) for vs in itertools.product(*(choices[n] for n in names))]


def pair_name(v: dict) -> str:
    return "_".join(f"{k.removeprefix('prefill_')}{x}" for k, x in v.items())


def set_knobs(v: dict):
    for k, x in v.items():
        ops.cuda_variant(k, x)


@contextlib.contextmanager
def knobs_restored():
    before = {name: ops.cuda_variant(name) for name in ops.CUDA_VARIANTS}
    try:
        yield before
    finally:
        set_knobs(before)


def pick_prefill(sz: dict) -> dict | None:
    """The prefill variant pair to make this GPU's default: among the pairs within PARITY_TOL of HF eager at every
    measured size, the one with the smallest sum over sizes of its time / the fastest pair's time there; None when
    no size was measured or no pair is within the tolerance everywhere."""
    rows = [r for k, r in sz.items() if k.startswith("prefill_fp32/") and isinstance(r, dict) and r.get("pairs")]
    if not rows:
        return None
    ok = set.intersection(*({p for p, x in r["pairs"].items() if x["max_abs_dlogits"] <= PARITY_TOL} for r in rows))
    if not ok:
        return None

    def score(p):
        return sum(r["pairs"][p]["ms"] / min(x["ms"] for x in r["pairs"].values()) for r in rows)

    return dict(rows[0]["pairs"][min(sorted(ok), key=score)]["variants"])


# ---- models: random weights with the exact configs, drawn on the GPU (seconds, not minutes)

class Models:
    """Per size, created on first use: HF as from_pretrained gives it (sdpa; eager for the parity reference, the
    same object) and gpt2kern.optimize() on a copy."""

    def __init__(self, dev):
        self.dev, self.m = dev, {}

    def get(self, name: str) -> dict:
        if name not in self.m:
            from gpt2kern.model.loading import random_model
            hf = random_model(name, attn_implementation="sdpa", device=self.dev)
            ours = gpt2kern.optimize(copy.deepcopy(hf))
            self.m[name] = dict(hf=hf, ours=ours, params=sum(p.numel() for p in hf.parameters()), ref_tokens={})
        return self.m[name]


@contextlib.contextmanager
def attn_implementation(model, impl: str):
    before = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def prompt_of(vocab: int, B: int, T: int, dev, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g).to(dev)


def hf_generate(model, prompt):
    kw = dict(do_sample=False, pad_token_id=0)
    return lambda n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)


def ref_tokens(m: dict, prompt):
    """HF eager's greedy tokens (the parity reference of every fp32 decoder), once per size and prompt shape."""
    key = tuple(prompt.shape)
    if key not in m["ref_tokens"]:
        with attn_implementation(m["hf"], "eager"), torch.no_grad():
            m["ref_tokens"][key] = m["hf"].generate(prompt, max_new_tokens=TOKENS_N, do_sample=False, pad_token_id=0)
    return m["ref_tokens"][key]


def token_agreement(hf_tokens, ours_tokens, start: int, eos) -> dict:
    """equal: every row's tokens equal HF's up to its EOS (end_to_end's rule); agree_tokens: the fewest leading new
    tokens equal in a row."""
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    a, o = hf_tokens.tolist(), ours_tokens[:, : hf_tokens.shape[1]].tolist()
    equal = all(_cut(x, start, eos) == _cut(y, start, eos) for x, y in zip(a, o))
    lead = min(next((i for i, (p, q) in enumerate(zip(x[start:], y[start:])) if p != q), len(x) - start)
               for x, y in zip(a, o))
    return dict(equal=equal, agree_tokens=lead, of_tokens=hf_tokens.shape[1] - start)


COPY_BYTES = 2 ** 31  # the bandwidth measure's buffer


def copy_bandwidth(dev, nbytes: int | None = None) -> float:
    """GB/s of a device copy, read + write of an nbytes buffer (the decode floor's bandwidth)."""
    nbytes = nbytes or COPY_BYTES
    src = torch.empty(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    t = Bench(device="cuda", reps=5).time({"copy": lambda: dst.copy_(src)})["copy"]
    return 2 * nbytes / t / 1e9


# ---- the parts

def prefill_fp32(models: Models, name: str, pairs: list) -> dict:
    """T=1024 B=1, all logits, fp32: HF sdpa vs optimize() under every prefill variant pair (interleaved), each
    pair's max |logits - HF eager|; best: the fastest pair within PARITY_TOL."""
    m = models.get(name)
    hf, ours = m["hf"], m["ours"]
    ids = prompt_of(hf.config.vocab_size, 1, min(PREFILL_T, hf.config.n_positions), models.dev, seed=2)
    rows = {}
    with torch.no_grad(), knobs_restored():
        with attn_implementation(hf, "eager"):
            ref = hf(ids).logits
        fns = {"hf_sdpa": lambda: hf(ids)}
        for p in pairs:
            fns[pair_name(p)] = lambda p=p: (set_knobs(p), ours(ids))[1]
        t = Bench(device="cuda", reps=5).time(fns)
        for p in pairs:
            set_knobs(p)
            out = ours(ids).logits
            why = gpt2kern.fallback_reason(ours)
            if why is not None:
                raise RuntimeError(f"optimize()'s forward fell back to HF's: {why}")
            rows[pair_name(p)] = dict(variants=p, ms=t[pair_name(p)] * 1e3,
                                      max_abs_dlogits=(out - ref).abs().max().item())
            del out
        del ref
    hf_ms = t["hf_sdpa"] * 1e3
    ok = {k: r for k, r in rows.items() if r["max_abs_dlogits"] <= PARITY_TOL}
    best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
    out = dict(hf_sdpa_ms=hf_ms, pairs=rows, best=best)
    if best:
        out.update(best_ms=ok[best]["ms"], speedup=hf_ms / ok[best]["ms"], max_abs_dlogits=ok[best]["max_abs_dlogits"])
    for k, r in rows.items():
        print(f"    {name} prefill T=1024: {k} {r['ms']:.2f} ms ({hf_ms / r['ms']:.2f}x HF sdpa {hf_ms:.2f} ms), "
              f"max|dlogits| {r['max_abs_dlogits']:.2g}", flush=True)
    return out


def gpu_sm() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def decode_combos(B: int, only=None) -> list:
    """The CUDA-graph decoder's fp32 variant sets (every name of cuda_graph.VARIANTS: gemv, kv_write, launch, ...)
    that can run at batch size B on this GPU: all, or the default and those in `only`; the default first."""
    from gpt2kern.decode import cuda_graph
    sm = gpu_sm()
    default = cuda_graph.default_variants(torch.cuda.get_device_name(), B, sm=sm)
    names = list(cuda_graph.VARIANTS)
    combos = [dict(zip(names, vs)) for vs in itertools.product(*(cuda_graph.VARIANTS[n] for n in names))]
    combos = [c for c in combos if not cuda_graph.refusals(c, B, sm=sm)]
    if only is not None:
        combos = [c for c in combos if c in only]
    return [default] + [c for c in combos if c != default]


def decoder_name(v: dict) -> str:
    """gemv2_kvwrite2 (plain launches), gemv2_kvwrite2_pdl (launch 2), other variants by name and number."""
    out = f"gemv{v.get('gemv')}_kvwrite{v.get('kv_write')}"
    for k, x in v.items():
        if k == "launch":
            out += "_pdl" if x == 2 else "" if x == 1 else f"_launch{x}"
        elif k not in ("gemv", "kv_write"):
            out += f"_{k}{x}"
    return out


def decode_fp32(models: Models, name: str, B: int, only=None, floor_GBps: float | None = None) -> dict:
    """Decode at batch size B, fp32, ms per step (interleaved, decode_rates): HF sdpa generate vs CudaGraphDecoder
    per variant pair; each decoder's greedy tokens vs HF eager's (a mismatch fails the run), its kernels per token;
    the bandwidth floor (params x 4 B / copy bandwidth) and the fraction the fastest reaches."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    m = models.get(name)
    hf, ours = m["hf"], m["ours"]
    prompt = prompt_of(hf.config.vocab_size, B, PROMPT_T, models.dev)
    n_short, n_long = DECODE_N
    combos = decode_combos(B, only)
    max_len = PROMPT_T + max(n_long, TOKENS_N)
    decs = {decoder_name(c): CudaGraphDecoder(ours, batch_size=B, max_len=max_len, **c) for c in combos}
    gens = {"hf_sdpa": hf_generate(hf, prompt)}
    for k, d in decs.items():
        gens[k] = lambda n, d=d: d.generate(prompt, n)
    with torch.no_grad():
        rates = decode_rates(Bench(device="cuda", reps=5), gens, n_short, n_long, reps=5)
        ref = ref_tokens(m, prompt)
        eos = hf.generation_config.eos_token_id
        rows = {}
        for k, d in decs.items():
            agree = token_agreement(ref, d.generate(prompt, TOKENS_N), PROMPT_T, eos)
            lpt = d.launches_per_token or {}
            rows[k] = dict(ms=rates[k] * 1e3, variants=dict(d.variants), tokens_equal_hf=agree["equal"],
                           launches_per_token=lpt, kernels_per_token=lpt.get("kernel"))
    decs.clear()
    hf_ms = rates["hf_sdpa"] * 1e3
    best = min(rows, key=lambda k: rows[k]["ms"])
    out = dict(batch_size=B, hf_sdpa_ms=hf_ms, decoders=rows, best=best, best_ms=rows[best]["ms"],
               speedup=hf_ms / rows[best]["ms"], default=decoder_name(combos[0]),
               tokens_equal_hf_by_decoder={k: r["tokens_equal_hf"] for k, r in rows.items()},
               hf_tokens_per_s=B * 1e3 / hf_ms, best_tokens_per_s=B * 1e3 / rows[best]["ms"], params=m["params"])
    if floor_GBps:
        out["floor_ms"] = m["params"] * 4 / (floor_GBps * 1e9) * 1e3
        out["floor_fraction"] = out["floor_ms"] / out["best_ms"]
    for k, r in rows.items():
        print(f"    {name} decode B={B}: {k} {r['ms']:.3f} ms/step ({hf_ms / r['ms']:.1f}x HF sdpa {hf_ms:.2f}), "
              f"kernels/token {r['kernels_per_token']}, tokens == HF: {r['tokens_equal_hf']}", flush=True)
    return out


def decode_weights(models: Models, name: str) -> dict:
    """Decode B=1 with fp32 / bf16 / fp16 / int8 weights (CudaGraphDecoder(weights=...), default variants),
    interleaved, ms per token; tokens vs HF eager's are reported (not expected equal for the reduced modes)."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    m = models.get(name)
    hf, ours = m["hf"], m["ours"]
    prompt = prompt_of(hf.config.vocab_size, 1, PROMPT_T, models.dev)
    n_short, n_long = DECODE_N
    decs = {mode: CudaGraphDecoder(ours, batch_size=1, max_len=PROMPT_T + max(n_long, TOKENS_N),
                                   weights=None if mode == "fp32" else mode) for mode in ("fp32",) + REDUCED}
    gens = {k: (lambda n, d=d: d.generate(prompt, n)) for k, d in decs.items()}
    with torch.no_grad():
        rates = decode_rates(Bench(device="cuda", reps=5), gens, n_short, n_long, reps=5)
        ref = ref_tokens(m, prompt)
        out = {}
        for k, d in decs.items():
            agree = token_agreement(ref, d.generate(prompt, TOKENS_N), PROMPT_T, hf.generation_config.eos_token_id)
            out[k] = dict(ms=rates[k] * 1e3, variants=dict(d.variants), tokens_equal_hf=agree["equal"],
                          agree_tokens=agree["agree_tokens"], of_tokens=agree["of_tokens"],
                          kernels_per_token=(d.launches_per_token or {}).get("kernel"))
            print(f"    {name} decode B=1 weights {k}: {out[k]['ms']:.3f} ms/token, tokens == HF: {agree['equal']} "
                  f"({agree['agree_tokens']}/{agree['of_tokens']} leading)", flush=True)
    decs.clear()
    return out


def prefill_bf16(models: Models, name: str) -> dict:
    """T=1024 B=1 all logits: optimize(weights='bf16') vs HF with the model in bfloat16 (sdpa), interleaved; their
    max |logits - HF fp32 eager| for context."""
    m = models.get(name)
    hf = m["hf"]
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours16 = gpt2kern.optimize(copy.deepcopy(hf), weights="bf16")
    ids = prompt_of(hf.config.vocab_size, 1, min(PREFILL_T, hf.config.n_positions), models.dev, seed=2)
    with torch.no_grad():
        t = Bench(device="cuda", reps=5).time({"hf_bf16": lambda: hf16(ids), "ours_bf16": lambda: ours16(ids)})
        with attn_implementation(hf, "eager"):
            ref = hf(ids).logits
        ours_err = (ours16(ids).logits - ref).abs().max().item()
        why = gpt2kern.fallback_reason(ours16)
        if why is not None:
            raise RuntimeError(f"optimize(weights='bf16')'s forward fell back to HF's: {why}")
        hf_err = (hf16(ids).logits.float() - ref).abs().max().item()
    out = dict(hf_bf16_ms=t["hf_bf16"] * 1e3, ours_ms=t["ours_bf16"] * 1e3, speedup=t["hf_bf16"] / t["ours_bf16"],
               ours_max_abs_dlogits_vs_fp32=ours_err, hf_bf16_max_abs_dlogits_vs_fp32=hf_err)
    print(f"    {name} prefill T=1024 bf16: ours {out['ours_ms']:.2f} ms, HF bf16 {out['hf_bf16_ms']:.2f} ms "
          f"({out['speedup']:.2f}x); max|dlogits| vs fp32: ours {ours_err:.2g}, HF bf16 {hf_err:.2g}", flush=True)
    return out


def hf_static_compiled(model, max_cache_len: int, compile_kw: dict | None = None):
    """HF's static cache with a compiled forward, as its docs (llm_optims, "Static kv-cache and torch.compile")
    give it: generation_config.cache_implementation = "static" and model.forward = torch.compile(model.forward,
    mode="reduce-overhead", fullgraph=True); max_cache_len (transformers >= 5.17's GenerationConfig) sizes the one
    cache every call reuses, so calls of other lengths do not recompile. -> gen(prompt, n)."""
    model.generation_config.cache_implementation = "static"
    model.generation_config.max_cache_len = max_cache_len
    kw = dict(mode="reduce-overhead", fullgraph=True) if compile_kw is None else compile_kw
    model.forward = torch.compile(model.forward, **kw)
    return lambda prompt, n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                            pad_token_id=0)


def hf_compiled_worker(out_path: str) -> int:
    """The child of the hf_static_compiled part (its own process: a compile that hangs or crashes costs the part,
    not the step): gpt2 decode B=1, HF static cache + compiled forward vs the default CudaGraphDecoder, interleaved
    in this process; the compile's seconds (the first calls) measured once."""
    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    from gpt2kern.model.loading import random_model
    dev = torch.device("cuda")
    n_short, n_long = DECODE_N
    res = dict(model="gpt2")
    hf = random_model("gpt2", attn_implementation="sdpa", device=dev)
    ours = gpt2kern.optimize(copy.deepcopy(hf))
    dec = CudaGraphDecoder(ours, batch_size=1, max_len=PROMPT_T + max(n_long, TOKENS_N))
    prompt = prompt_of(hf.config.vocab_size, 1, PROMPT_T, dev)
    tries = (("forward compiled, mode='reduce-overhead', fullgraph=True", None),
             ("forward compiled, mode='reduce-overhead' (fullgraph=True failed)", dict(mode="reduce-overhead")))
    gen = None
    for how, kw in tries:
        comp = copy.deepcopy(hf)
        try:
            g = hf_static_compiled(comp, PROMPT_T + n_long, kw)
            t0 = time.perf_counter()
            with torch.no_grad():
                g(prompt, n_long)
                torch.cuda.synchronize()
                res["first_call_s"] = time.perf_counter() - t0
                for n in (n_long, n_short, n_short):  # reduce-overhead records its graphs over the first calls
                    g(prompt, n)
                torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            res["how"], gen = how, g
            break
        except Exception as e:  # the next try, from a clean dynamo
            traceback.print_exc()
            res.setdefault("tries_failed", []).append(f"{how}: {type(e).__name__}: {e}"[:300])
            torch._dynamo.reset()
    if gen is None:
        raise RuntimeError("; ".join(res["tries_failed"]))
    print(f"    HF static cache + torch.compile ({res['how']}): first call {res['first_call_s']:.1f}s, "
          f"warm after {res['compile_s']:.1f}s", flush=True)
    with torch.no_grad():
        rates = decode_rates(Bench(device="cuda", reps=5), {"hf_static_compiled": lambda n: gen(prompt, n),
                                                            "ours": lambda n: dec.generate(prompt, n)},
                             n_short, n_long, reps=5)
        theirs = comp.generate(prompt, max_new_tokens=TOKENS_N, do_sample=False, pad_token_id=0)
        agree = token_agreement(theirs, dec.generate(prompt, TOKENS_N), PROMPT_T, hf.generation_config.eos_token_id)
    res.update(hf_ms=rates["hf_static_compiled"] * 1e3, ours_ms=rates["ours"] * 1e3, ours_variants=dec.variants,
               speedup=rates["hf_static_compiled"] / rates["ours"], tokens_equal_ours=agree["equal"])
    print(f"    gpt2 decode B=1: HF static+compiled {res['hf_ms']:.3f} ms/token, ours {res['ours_ms']:.3f} "
          f"({res['speedup']:.2f}x)", flush=True)
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0


def run_hf_compiled(deadline: Deadline, cap_s: float = 90.0) -> dict:
    """hf_compiled_worker in a child process (its own session: a timeout kills it and inductor's compile workers),
    given min(cap_s, the time left less 5 s)."""
    timeout = max(1.0, min(cap_s, deadline.left() - 5))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "hf_compiled.json")
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hf-compiled-worker", out],
                             start_new_session=True)

        def terminated(signum, frame):  # this step killed (its `timeout`): the child's session goes too (finally)
            raise SystemExit(128 + signum)

        before = signal.signal(signal.SIGTERM, terminated)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"HF static cache + torch.compile did not finish in {timeout:.0f}s") from None
        finally:
            signal.signal(signal.SIGTERM, before)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if rc != 0 or not os.path.exists(out):
            raise RuntimeError(f"the HF static cache + torch.compile child exited with {rc}")
        with open(out) as f:
            return json.load(f)


def sizes_plan(run: SizesRun, models: Models, pairs: list, bw):
    """The parts in order of value (the issue's targets first, each at its cheapest size first; the extras last),
    each with its estimated seconds on an H200 (~1.5x the 2026-12-04 side-by-side run's)."""
    res = run.res
    for name, est in (("gpt2", 6), ("gpt2-medium", 8), ("gpt2-xl", 18)):
        run.part(f"prefill_fp32/{name}", est, lambda name=name: prefill_fp32(models, name, pairs))
    run.part("decode_b1/gpt2", 8, lambda: decode_fp32(models, "gpt2", 1, floor_GBps=bw))
    gpt2 = res.get("decode_b1/gpt2") or {}
    fastest = [r["variants"] for k, r in sorted(gpt2.get("decoders", {}).items(), key=lambda kv: kv[1]["ms"])
               if r["tokens_equal_hf"]][:1]
    # xl: the default decoder and gpt2's fastest (all ten would take ~20 s more)
    run.part("decode_b1/gpt2-xl", 14, lambda: decode_fp32(models, "gpt2-xl", 1, only=fastest, floor_GBps=bw))
    run.part("decode_b32/gpt2", 12, lambda: decode_fp32(models, "gpt2", 32))
    run.part("prefill_bf16/gpt2", 5, lambda: prefill_bf16(models, "gpt2"))
    run.part("decode_weights/gpt2-xl", 12, lambda: decode_weights(models, "gpt2-xl"))
    run.part("hf_static_compiled/gpt2", 40, lambda: run_hf_compiled(run.deadline), optional=True)
    # extras, only with time left: not targets of the issue (medium decode), or sizes beyond the target's "gpt2 at
    # least" (bf16 prefill)
    run.part("decode_b1/gpt2-medium", 12, lambda: decode_fp32(models, "gpt2-medium", 1, only=fastest, floor_GBps=bw))
    run.part("prefill_bf16/gpt2-medium", 6, lambda: prefill_bf16(models, "gpt2-medium"))
    run.part("prefill_bf16/gpt2-xl", 14, lambda: prefill_bf16(models, "gpt2-xl"))


def sizes(deadline: Deadline, save=None, dev=None) -> dict:
    """gpt2, gpt2-medium and gpt2-xl against HF on this GPU, side by side in this process: the issue #28 table's
    measures (target_table), until the deadline. (`dev`: the tests run it on the CPU with fakes.)"""
    from gpt2kern.kernels import cuda_table
    dev = torch.device("cuda") if dev is None else dev
    run = SizesRun(deadline, save)
    res = run.res
    res["table_prefill_defaults"] = cuda_table.apply_once(dev)  # as optimize() would, before any knob is probed
    res["knobs_at_start"] = {name: ops.cuda_variant(name) for name in ops.CUDA_VARIANTS}
    choices = knob_choices()
    res["knob_choices"] = choices
    pairs = knob_pairs(choices)
    print(f"  prefill variant pairs: {[pair_name(p) for p in pairs]} (now {res['knobs_at_start']})", flush=True)
    bw = run.part("copy_bandwidth", 3, lambda: dict(GBps=copy_bandwidth(dev)))
    bw = bw["GBps"] if bw else None
    if bw:
        print(f"  copy bandwidth {bw:.0f} GB/s (read + write of a {COPY_BYTES / 2 ** 30:g} GiB buffer)", flush=True)
    models = Models(dev)
    sizes_plan(run, models, pairs, bw)
    res["knobs_at_end"] = {name: ops.cuda_variant(name) for name in ops.CUDA_VARIANTS}
    res["prefill_defaults"] = pick_prefill(res)
    return res


# ---- the issue's target table

TARGETS = (  # measure, now (issue #28, H200 2026-12-04), target
    ("prefill T=1024 all logits, fp32, gpt2 / medium / xl vs HF sdpa fp32", "0.36× / 0.39× / 0.39×",
     "≥ 1.2× each, max \\|Δlogit\\| ≤ 1e-4"),
    ("decode B=1 fp32, gpt2 / gpt2-xl, ms/token", "0.93 / 6.52", "≤ 0.30 / ≤ 1.9 (≥ 77 % of bandwidth on xl)"),
    ("decode B=1 gpt2 vs HF static cache + torch.compile", "2.6×", "≥ 8×"),
    ("decode B=1 gpt2-xl, bf16 / fp16 / int8 weights, ms/token", "8.57 / 8.55 / 6.94", "≤ 1.0 / ≤ 1.0 / ≤ 0.6"),
    ("decode B=32 gpt2, tokens/s vs HF sdpa generate", "not measured", "≥ 6×"),
    ('prefill T=1024 with weights="bf16" vs HF with the model in bfloat16', "not measured", "≥ 1.0×"),
)


def _verdict(checks: list) -> str:
    """'no' when a measured check failed, 'yes' when all were measured and passed, else 'not measured'."""
    if any(c is False for c in checks):
        return "no"
    return "yes" if checks and all(c is True for c in checks) else "not measured"


def _why_missing(sz: dict, key: str) -> str:
    st = sz.get("parts", {}).get(key)
    if st is None:
        return "not run"
    return "error" if st.startswith("error") else ("not measured" if st == NOT_MEASURED else st)


def _x(v, fmt="{:.2f}×"):
    return fmt.format(v)


def target_rows(sz: dict) -> list:
    """[(measure, now, measured, target, met)] for TARGETS from a sizes() result ('met': yes / no / not measured)."""
    rows = []
    short = {"gpt2": "gpt2", "gpt2-medium": "medium", "gpt2-xl": "xl"}

    def got(key):
        r = sz.get(key)
        return r if isinstance(r, dict) else None

    # 1. prefill fp32
    cells, checks, errs = [], [], []
    for s in SIZES:
        r = got(f"prefill_fp32/{s}")
        if r and r.get("speedup") is not None:
            cells.append(_x(r["speedup"]))
            checks += [r["speedup"] >= 1.2, r["max_abs_dlogits"] <= PARITY_TOL]
            errs.append(r["max_abs_dlogits"])
        elif r:  # measured, but no pair within the parity tolerance
            cells.append("off parity")
            checks.append(False)
        else:
            cells.append(_why_missing(sz, f"prefill_fp32/{s}"))
            checks.append(None)
    m = " / ".join(cells) + (f" (max \\|Δ\\| {max(errs):.1g})" if errs else "")
    rows.append((*TARGETS[0][:2], m, TARGETS[0][2], _verdict(checks)))
    # 2. decode B=1 fp32 gpt2 / xl
    a, b = got("decode_b1/gpt2"), got("decode_b1/gpt2-xl")
    cells = [f"{a['best_ms']:.3g}" if a else _why_missing(sz, "decode_b1/gpt2"),
             f"{b['best_ms']:.3g}" if b else _why_missing(sz, "decode_b1/gpt2-xl")]
    frac = b.get("floor_fraction") if b else None
    m = " / ".join(cells) + (f" ({frac:.0%} of bandwidth on xl)" if frac is not None else "")
    checks = [a["best_ms"] <= 0.30 if a else None, b["best_ms"] <= 1.9 if b else None,
              (frac >= 0.77) if frac is not None else None]
    rows.append((*TARGETS[1][:2], m, TARGETS[1][2], _verdict(checks)))
    # 3. vs HF static cache + compile
    r = got("hf_static_compiled/gpt2")
    m = (f"{_x(r['speedup'])} ({r['ours_ms']:.3g} vs {r['hf_ms']:.3g} ms/token)" if r
         else _why_missing(sz, "hf_static_compiled/gpt2"))
    rows.append((*TARGETS[2][:2], m, TARGETS[2][2], _verdict([r["speedup"] >= 8 if r else None])))
    # 4. xl reduced weights
    r = got("decode_weights/gpt2-xl")
    limits = dict(bf16=1.0, fp16=1.0, int8=0.6)
    if r:
        m = " / ".join(f"{r[k]['ms']:.3g}" for k in REDUCED)
        m += " (tokens = HF: " + ", ".join(f"{k} {r[k]['agree_tokens']}/{r[k]['of_tokens']}" for k in REDUCED) + ")"
        checks = [r[k]["ms"] <= limits[k] for k in REDUCED]
    else:
        m, checks = _why_missing(sz, "decode_weights/gpt2-xl"), [None]
    rows.append((*TARGETS[3][:2], m, TARGETS[3][2], _verdict(checks)))
    # 5. B=32
    r = got("decode_b32/gpt2")
    m = (f"{_x(r['speedup'])} ({r['best_tokens_per_s']:,.0f} vs {r['hf_tokens_per_s']:,.0f} tokens/s)" if r
         else _why_missing(sz, "decode_b32/gpt2"))
    rows.append((*TARGETS[4][:2], m, TARGETS[4][2], _verdict([r["speedup"] >= 6 if r else None])))
    # 6. bf16 prefill: gpt2 at least, the other sizes where measured
    cells, checks = [], []
    for s in SIZES:
        r = got(f"prefill_bf16/{s}")
        if r:
            cells.append(f"{short[s]} {_x(r['speedup'])}")
            checks.append(r["speedup"] >= 1.0)
        elif s == "gpt2":
            cells.append(f"gpt2 {_why_missing(sz, 'prefill_bf16/gpt2')}")
            checks.append(None)
    rows.append((*TARGETS[5][:2], " / ".join(cells), TARGETS[5][2], _verdict(checks)))
    return rows


def target_table(sz: dict, device: str = "") -> str:
    """The issue's target table as markdown, then the details each row came from."""
    out = [f"GPT-2 sizes on {device or 'this GPU'} (bench/gpu_bench.py --sizes; ratios side by side in one process)",
           "", "| measure | now | measured | target | met? |", "|---|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in target_rows(sz)]
    out += ["", "Details:"]
    bw = sz.get("copy_bandwidth")
    if isinstance(bw, dict):
        out.append(f"- copy bandwidth {bw['GBps']:.0f} GB/s (read + write of a {COPY_BYTES / 2 ** 30:g} GiB buffer)")
    for s in SIZES:
        r = sz.get(f"prefill_fp32/{s}")
        if isinstance(r, dict):
            pairs = ", ".join(f"{k} {x['ms']:.2f} ms (max |Δ| {x['max_abs_dlogits']:.1g})"
                              for k, x in r["pairs"].items())
            out.append(f"- {s} prefill T=1024 fp32: HF sdpa {r['hf_sdpa_ms']:.2f} ms; ours {pairs}; best {r['best']}")
    for key in ("decode_b1/gpt2", "decode_b1/gpt2-medium", "decode_b1/gpt2-xl", "decode_b32/gpt2"):
        r = sz.get(key)
        if isinstance(r, dict):
            decs = ", ".join(f"{k} {x['ms']:.3f} ({x['kernels_per_token']} kernels/token"
                             f"{'' if x['tokens_equal_hf'] else ', TOKENS DIFFER'})" for k, x in r["decoders"].items())
            floor = (f"; floor {r['floor_ms']:.3f} ms ({r['floor_fraction']:.0%} reached)" if "floor_ms" in r else "")
            out.append(f"- {key} ms/step: HF sdpa {r['hf_sdpa_ms']:.2f}; {decs}; default {r['default']}{floor}")
    r = sz.get("hf_static_compiled/gpt2")
    if isinstance(r, dict):
        out.append(f"- gpt2 HF static cache + compile ({r['how']}): {r['hf_ms']:.3f} ms/token, compile "
                   f"{r['compile_s']:.1f}s; ours {r['ours_ms']:.3f}; tokens equal ours: {r['tokens_equal_ours']}")
    r = sz.get("decode_weights/gpt2-xl")
    if isinstance(r, dict):
        out.append("- gpt2-xl decode B=1 by weights: " + ", ".join(
            f"{k} {x['ms']:.3f} ms ({x['agree_tokens']}/{x['of_tokens']} tokens = HF)" for k, x in r.items()))
    for s in SIZES:
        r = sz.get(f"prefill_bf16/{s}")
        if isinstance(r, dict):
            out.append(f"- {s} prefill T=1024 bf16: ours {r['ours_ms']:.2f} ms, HF bf16 {r['hf_bf16_ms']:.2f} ms; "
                       f"max |Δ| vs fp32 ours {r['ours_max_abs_dlogits_vs_fp32']:.2g}, "
                       f"HF bf16 {r['hf_bf16_max_abs_dlogits_vs_fp32']:.2g}")
    if sz.get("prefill_defaults"):
        out.append(f"- prefill defaults picked for this GPU: {sz['prefill_defaults']}")
    parts = sz.get("parts", {})
    out.append("- parts: " + ", ".join(f"{k} {v}" + (f" {sz['part_s'][k]}s" if k in sz.get("part_s", {}) else "")
                                       for k, v in parts.items()))
    return "\n".join(out) + "\n"


def sizes_failures(sz: dict) -> list:
    """What fails a --sizes run: an fp32 decoder whose greedy tokens differ from HF's (the reduced weight modes'
    are reported only), a prefill variant pair off
    HF eager by more than PARITY_TOL, a part that raised (except the optional ones: HF's compiled path).
    Targets not met and parts not measured for time do not fail it."""
    failed = []
    for k, r in sz.items():
        if not isinstance(r, dict):
            continue
        if k.startswith(("decode_b1/", "decode_b32/")):
            eq = r.get("tokens_equal_hf_by_decoder", {})
            bad = [d for d, ok in eq.items() if not ok]
            if bad or not eq:
                failed.append(f"{k}: the greedy tokens of {', '.join(bad) or 'no decoder'} differ from HF's")
        if k.startswith("decode_weights/") and not r.get("fp32", {}).get("tokens_equal_hf", True):
            failed.append(f"{k}: the greedy tokens of the fp32 decoder differ from HF's")
        if k.startswith("prefill_fp32/"):
            failed += [f"{k} {p}: max|dlogits| {x['max_abs_dlogits']:.2g} > {PARITY_TOL}"
                       for p, x in r.get("pairs", {}).items() if x["max_abs_dlogits"] > PARITY_TOL]
    failed += [f"{k}: {v}" for k, v in sz.get("parts", {}).items()
               if v.startswith("error") and k not in sz.get("optional_parts", [])]
    return failed


def _write_atomic(path: str, text: str):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def sizes_main(a, res: dict) -> int:
    deadline = Deadline(a.deadline_s, age=process_age())
    print(f"GPT-2 sizes (deadline {a.deadline_s}s from the process start, {deadline.left():.0f}s left):", flush=True)

    def save(sz):
        res["sizes"] = sz
        if a.json:
            _write_atomic(a.json, json.dumps(res, indent=1, default=str))
        if a.table_out:
            _write_atomic(a.table_out, target_table(sz, res["device"]))

    sz = sizes(deadline, save)
    save(sz)
    print(target_table(sz, res["device"]), flush=True)
    if a.variants_out and sz.get("prefill_defaults"):
        how = f"{time.strftime('%Y-%m-%d')} bench/gpu_bench.py --sizes, torch {torch.__version__}"
        base = a.variants_out if os.path.exists(a.variants_out) else None  # gpu_check: gpu_bench's decoder entry
        write_variant_table(a.variants_out, res["device"], None, how, prefill=sz["prefill_defaults"], base=base)
        print(f"  wrote {a.variants_out} with prefill defaults {sz['prefill_defaults']}: copy it to "
              f"gpt2kern/decode/cuda_variants.json to make them this GPU's defaults", flush=True)
    failed = failures(res)
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), flush=True)
        return 1
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="CUDA benchmark: gpt2kern's CUDA kernels, their numbered variants and "
                                "the CUDA-graph decoders vs torch and HF eager (bench/gpu_check.sh runs it).")
    p.add_argument("--json", default=None)
    p.add_argument("--variants-out", default=None,
                   help="write gpt2kern/decode/cuda_variants.json with this GPU's measured decoder defaults here")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--sizes", action="store_true",
                   help="instead: gpt2 / gpt2-medium / gpt2-xl end to end vs HF (issue #28's table), the prefill "
                   "variant pairs' winner into --variants-out; ~95 s on an H200")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="--sizes: seconds from this process's start; a part that would not fit is recorded as "
                   f"'{NOT_MEASURED}' (gpu_check.sh: the step's limit less a margin)")
    p.add_argument("--table-out", default=None, help="--sizes: write the target table (markdown) here")
    p.add_argument("--hf-compiled-worker", default=None, help=argparse.SUPPRESS)  # --sizes' child process
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not ops.has_cuda():
        print("no CUDA GPU or gpt2kern built without CUDA: nothing to benchmark")
        return 2
    if a.hf_compiled_worker:
        return hf_compiled_worker(a.hf_compiled_worker)
    dev = torch.device("cuda")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    print(f"device: {res['device']}, torch {torch.__version__}", flush=True)
    if a.sizes:
        import transformers
        res["transformers"] = transformers.__version__
        return sizes_main(a, res)
    print("kernels (median per call, interleaved with torch):", flush=True)
    res["kernels"] = kernels(Bench(device="cuda", reps=7), a.quick)
    if a.json:  # partial results survive a timeout in the end-to-end part
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print("weight modes: conv1d fp32 / fp16 / bf16 / int8 (median per call, interleaved per shape):", flush=True)
    res["weight_modes"] = lowp(a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print("numbered kernel variants (median per call, interleaved):", flush=True)
    res["variants"], res["variant_winners"] = variants(a.quick)
    rows, winners = prefill_gemm(a.quick)
    res["variants"] += rows
    res["variant_winners"] += winners
    rows, winners = attention_variants()
    res["variants"] += rows
    res["variant_winners"] += winners
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not a.skip_e2e:
        print("end to end:", flush=True)
        res["e2e"], res["launches_per_token"] = end_to_end(dev, a.quick)
        res["decoder_defaults"] = pick_defaults(res["e2e"])
        print(f"  decoder defaults (fastest with HF's tokens, per batch size): {res['decoder_defaults']}", flush=True)
        if a.variants_out and res["decoder_defaults"]:
            how = (f"{time.strftime('%Y-%m-%d')} bench/gpu_bench.py{' --quick' if a.quick else ''}, "
                   f"torch {torch.__version__}")
            write_variant_table(a.variants_out, res["device"], res["decoder_defaults"], how)
            print(f"  wrote {a.variants_out}: copy it to gpt2kern/decode/cuda_variants.json to make these the defaults",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    failed = failures(res)
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), flush=True)
        return 1
    return 0


def failures(res) -> list:
    """What fails the run: any decoder (graph or not, any variant) whose greedy tokens differ from HF's, and any
    numbered variant off its float64 reference."""
    failed = []
    for k, v in res.get("e2e", {}).items():
        if isinstance(v, dict) and "tokens_equal_hf_by_decoder" in v:
            bad = [d for d, ok in v["tokens_equal_hf_by_decoder"].items() if not ok]
            if bad or not v["tokens_equal_hf_by_decoder"]:
                failed.append(f"{k}: the greedy tokens of {', '.join(bad) or 'no decoder'} differ from HF's")
    failed += [f"{r['kernel']} {r['variant']} {r['shape']}: max|err| {r['max_abs_err']:.2g} > {VARIANT_TOL}"
               for r in res.get("variants", []) if r["variant"] in NUMBERED and r["max_abs_err"] > VARIANT_TOL]
    failed += [f"{r.get('variant', 'conv1d')} {r['mode']} weights {r['shape']}: relative error {r['rel_err']:.2g} > "
               f"{LOWP_TOL}" for r in res.get("weight_modes", []) if r["rel_err"] > LOWP_TOL]
    failed += sizes_failures(res.get("sizes", {}))
    return failed


if __name__ == "__main__":
    sys.exit(main())
