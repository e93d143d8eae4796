"""gpt2kern vs CTranslate2 on this machine, side by side (the CPU engine a user would otherwise pick).

    pip install ctranslate2          # not a project dependency
    python bench/compare_ctranslate2.py [--model random:distilgpt2] [--reps 7] [--threads 2] [--weights fp32 int8]
                                        [--ct2-int8 int8_float32] [--ct2-dir DIR] [--json out.json]

The same weights go to both: the model is saved with a placeholder GPT-2 tokenizer (CTranslate2's converter reads
its vocabulary; token i is spelled "t<i>") and converted with `ct2-transformers-converter`'s Python API, float32
and int8 (loaded with compute_type --ct2-int8: int8 weights, float32 elsewhere). gpt2kern runs each mode of
--weights (`gpt2kern.optimize(copy, weights=mode)`; fp32 is the exact default, int8 is the mode to hold against
CTranslate2's int8). Measured, interleaved, median of --reps, after a warm-up:
- decode: greedy, 16-token prompt, 128 new tokens, B=1 (CTranslate2 `generate_batch` with top-1 sampling and
  min_length = max_length, gpt2kern.generate with eos off), ms per new token, and tokens identical to HF greedy;
- prefill: all-position logits for one T-token prompt of random ids (CTranslate2 `forward_batch`, gpt2kern's
  optimized forward), and the error of each against HF eager fp32 on those ids, teacher-forced: max |Δlogits|,
  mean KL(p_fp32 ‖ p) and top-1 agreement over every position (`gpt2kern.cli.accuracy.logit_error`, the measures of
  llama.cpp's perplexity tool and of `gpt2kern bench --weights`).
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:distilgpt2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--weights", nargs="+", default=["fp32", "int8"], choices=["fp32", "fp16", "bf16", "int8"],
                    help="gpt2kern modes (fp32 always runs)")
    ap.add_argument("--ct2-int8", default="int8_float32", choices=["int8", "int8_float32"],
                    help="CTranslate2's compute_type for the int8 model")
    ap.add_argument("--ct2-dir", help="keep the converted models (and the HF save) here; default: a temporary "
                    "folder, removed once they are loaded")
    ap.add_argument("--json", dest="json_file")
    a = ap.parse_args(argv)
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        print("error: this comparison needs CTranslate2: pip install ctranslate2", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import GPT2Tokenizer

    import gpt2kern
    from gpt2kern import ops
    from gpt2kern.cli.accuracy import logit_error
    from gpt2kern.cli.bench import Bench  # interleaved rounds after a warm-up, median

    torch.set_num_threads(a.threads)
    ref, _ = gpt2kern.load(a.model)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    modes = ["fp32"] + [m for m in dict.fromkeys(a.weights) if m != "fp32"]
    opts = {m: gpt2kern.optimize(copy.deepcopy(ref), weights=m) for m in modes}
    name = {m: "gpt2kern" if m == "fp32" else f"gpt2kern {m}" for m in modes}  # fp32 keeps the older key
    V = ref.config.vocab_size
    tmp = a.ct2_dir or tempfile.mkdtemp(prefix="gk_ct2_")
    src = os.path.join(tmp, "hf")
    ref.save_pretrained(src)
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump({f"t{i}": i for i in range(V)}, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    GPT2Tokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"),
                  unk_token="t0", bos_token="t0", eos_token="t0").save_pretrained(src)
    gens = {}
    for ct in ("float32", "int8"):
        out = os.path.join(tmp, f"ct2_{ct}")
        TransformersConverter(src).convert(out, quantization=None if ct == "float32" else ct, force=True)
        gens[ct] = ctranslate2.Generator(out, device="cpu", compute_type=ct if ct == "float32" else a.ct2_int8,
                                         intra_threads=a.threads, inter_threads=1)
    if not a.ct2_dir:  # CTranslate2 holds the models in memory now
        shutil.rmtree(tmp, ignore_errors=True)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, V, (1, 16), generator=g)
    words = [[f"t{i}" for i in prompt[0].tolist()]]
    n = a.new_tokens
    res, outs = {}, {}

    def ct2_decode(ct):
        r = gens[ct].generate_batch(words, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                    include_prompt_in_result=False)
        outs[f"ct2 {ct}"] = r[0].sequences_ids[0]

    def ours_decode(m):
        outs[name[m]] = gpt2kern.generate(opts[m], prompt, max_new_tokens=n, eos_token_id=[])[0, 16:].tolist()

    fns = {**{name[m]: lambda m=m: ours_decode(m) for m in modes},
           "ct2 float32": lambda: ct2_decode("float32"), "ct2 int8": lambda: ct2_decode("int8")}
    times = Bench().time(fns, a.reps)
    with torch.no_grad():
        hf = ref.generate(prompt, max_new_tokens=n, do_sample=False)[0, 16:].tolist()
    res["decode"] = {k: dict(ms_per_token=1e3 * t / n, new_tokens=len(outs[k]),
                             tokens_identical_to_hf=f"{sum(x == y for x, y in zip(outs[k], hf))}/{n}")
                     for k, t in times.items()}

    res["prefill"] = {}
    for T in a.prefill:
        ids = torch.randint(0, V, (1, T), generator=g)
        toks = [[f"t{i}" for i in ids[0].tolist()]]
        with torch.no_grad():
            want = ref(ids).logits[0].double()
        got = {}
        fns = {**{name[m]: lambda m=m: got.__setitem__(name[m], opts[m](ids, use_cache=False).logits[0])
                  for m in modes},
               "ct2 float32": lambda: got.__setitem__("ct2 float32", gens["float32"].forward_batch(toks)),
               "ct2 int8": lambda: got.__setitem__("ct2 int8", gens["int8"].forward_batch(toks))}
        with torch.no_grad():
            times = Bench().time(fns, a.reps)
        row = {}
        for k, t in times.items():
            x = got[k] if k.startswith("gpt2kern") else torch.from_numpy(np.asarray(got[k]))[0]
            e = logit_error(want, x)
            row[k] = dict(ms=1e3 * t, max_abs_dlogits=e["max_abs"], mean_kld=e["mean_kld"],
                          top1_agreement=e["top1_agreement"], rel_l2=e["rel_l2"])
        res["prefill"][f"T={T}"] = row

    res.update(model=a.model, threads=a.threads, reps=a.reps, ctranslate2=ctranslate2.__version__,
               ct2_int8_compute_type=gens["int8"].compute_type, weights=modes, isa=ops.isa(),
               torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"gpt2kern vs CTranslate2 {ctranslate2.__version__} — {a.model}, {a.threads} threads, gpt2kern ISA "
          f"{res['isa']}, ct2 int8 compute_type {res['ct2_int8_compute_type']}, median of {a.reps}, {res['date']}")
    base = res["decode"]["gpt2kern"]["ms_per_token"]
    print(f"{'decode B=1, ms/token':<28} {'ms':>9} {'vs gpt2kern':>12}  tokens = HF greedy")
    for k, r in res["decode"].items():
        print(f"  {k:<26} {r['ms_per_token']:9.2f} {r['ms_per_token'] / base:11.2f}x  {r['tokens_identical_to_hf']}")
    for T, row in res["prefill"].items():
        base = row["gpt2kern"]["ms"]
        print(f"{'prefill ' + T + ', all logits':<28} {'ms':>9} {'vs gpt2kern':>12}  vs HF fp32: max |Δlogits|  "
              f"mean KLD  top-1")
        for k, r in row.items():
            print(f"  {k:<26} {r['ms']:9.1f} {r['ms'] / base:11.2f}x  {r['max_abs_dlogits']:22.2g} "
                  f"{r['mean_kld']:9.2g} {100 * r['top1_agreement']:5.1f}%")
    if "int8" in modes:
        d = res["decode"]["ct2 int8"]["ms_per_token"] / res["decode"]["gpt2kern int8"]["ms_per_token"]
        p = ", ".join(f"{T} {row['ct2 int8']['ms'] / row['gpt2kern int8']['ms']:.2f}x"
                      for T, row in res["prefill"].items())
        print(f"gpt2kern int8 vs CTranslate2 int8 (> 1: gpt2kern faster): decode {d:.2f}x; prefill {p}")
    if a.json_file:
        with open(a.json_file, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
