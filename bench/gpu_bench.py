"""CUDA benchmark (bench/gpu_check.sh runs it): gpt2kern's CUDA kernels vs their torch equivalents at distilgpt2's
shapes — the same kernel list as `gpt2kern bench` (gpt2kern.cli.bench.kernel_cases) —, the decode GEMV's numbered
variants against each other (v2/v3/v4: a table and the winner per shape),
and end to end vs HF as from_pretrained gives it (sdpa attention) and vs HF eager (the parity reference): prefill
T=512, decode B=1 and B=32 through HF generate and through CudaGraphDecoder
(without the graph, and with it for every gemv and kv_write variant pair), with the kernels launched per decode token
(graph nodes);
and the reduced weight modes' conv1d (fp16, bf16, int8 [in, out] on CUDA, csrc/cuda/matmul_lowp.cu) against
fp32 at decode and prefill shapes, with the decode GEMV variant 2 over their [out, in] copies (ops.matmul_nk) beside
it at decode rows, one table (time, speedup over fp32, weight GB/s, error vs float64 of the stored weights).
Timing: gpt2kern.bench's Bench.time (interleaved with its baseline, synchronized, median of >= 5), as on the CPU.
Exit 1 when any decoder's greedy tokens differ from HF's, or a variant's or weight mode's result is off its float64
reference.

    python bench/gpu_bench.py [--json FILE] [--quick] [--skip-e2e] [--variants-out FILE]
With --variants-out, the fastest decoder variants with HF's tokens per batch size are written as
gpt2kern/decode/cuda_variants.json plus this GPU's entry (commit that file to make them CudaGraphDecoder's defaults).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import gpt2kern
import gpt2kern.model.loading
from gpt2kern import ops
from gpt2kern.cli.bench import Bench, kernel_cases, sizes


def kernels(b: Bench, quick):
    cfg = gpt2kern.model.loading.random_config("distilgpt2")
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


VARIANT_TOL = 1e-4  # max |variant - float64 reference| that still counts as a result (fp32 over K <= 3072)
NUMBERED = ("v2", "v3", "v4")  # gpt2kern's variants (torch's: context)


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
            eager = dict(gemv=2, kv_write=2) if B == 1 else dict(gemv=3, kv_write=3)
            decs = {"decoder_no_graph": CudaGraphDecoder(ref, batch_size=B, max_len=T + n_long, use_graph=False,
                                                         **eager)}
            for gv, kw_ in ((gv, kw_) for gv in cuda_graph.VARIANTS["gemv"] for kw_ in cuda_graph.VARIANTS["kv_write"]
                            if not cuda_graph.refusals(dict(gemv=gv, kv_write=kw_), B)):
                name = f"decoder_cuda_graph_gemv{gv}_kvwrite{kw_}"
                decs[name] = CudaGraphDecoder(ref, batch_size=B, max_len=T + n_long, gemv=gv, kv_write=kw_)
                launches[f"B={B} gemv v{gv} kv_write v{kw_}"] = decs[name].launches_per_token
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


def write_variant_table(path: str, gpu: str, by_batch: dict, how: str) -> dict:
    """The packaged gpt2kern/decode/cuda_variants.json with this GPU's entry (re)placed, written to `path`."""
    from gpt2kern.decode import cuda_graph
    with open(cuda_graph.TABLE) as f:
        table = json.load(f)
    table["gpus"][gpu] = dict(measured=how, by_batch=by_batch)
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="CUDA benchmark: gpt2kern's CUDA kernels, their numbered variants and "
                                "the CUDA-graph decoders vs torch and HF eager (bench/gpu_check.sh runs it).")
    p.add_argument("--json", default=None)
    p.add_argument("--variants-out", default=None,
                   help="write gpt2kern/decode/cuda_variants.json with this GPU's measured decoder defaults here")
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
    print("weight modes: conv1d fp32 / fp16 / bf16 / int8 (median per call, interleaved per shape):", flush=True)
    res["weight_modes"] = lowp(a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print("numbered kernel variants (median per call, interleaved):", flush=True)
    res["variants"], res["variant_winners"] = variants(a.quick)
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
    return failed


if __name__ == "__main__":
    sys.exit(main())
