"""gpt2kern vs llama.cpp on this machine, side by side, on the same weights: speed and error, mode against file.

    python bench/compare_llamacpp.py --llama-bench BUILD/bin/llama-bench \\
        --gguf-f32 distil-f32.gguf [--gguf-f16 distil-f16.gguf] [--gguf-q8_0 distil-q8_0.gguf] \\
        [--llama-perplexity BUILD/bin/llama-perplexity] [--rounds 5] [--json F]

llama.cpp is not a dependency: build its `llama-bench` and `llama-perplexity` (cmake, GGML_NATIVE=ON, OpenMP) and
convert the model with its `convert_hf_to_gguf.py` (`--outtype f32` / `f16` / `q8_0`) from a `save_pretrained`
directory of the same model (`--model`, default random:distilgpt2; seed-fixed, so the weights match). `--gguf` is
`--gguf-f32`. Each llama.cpp file is paired with gpt2kern's weight mode(s) of the same width — f32 with fp32, f16
with fp16 and bf16, q8_0 with int8 (`gpt2kern.optimize(copy, weights=mode)`) — and `--weights` picks the modes
(default: every mode whose file was given, fp32 always).

Speed: rounds alternate every engine, so all see the same machine: llama-bench `tg128` (128 tokens decoded from an
empty context) against `gpt2kern.generate` from a 1-token prompt, and llama-bench `pp128`/`pp512` (prompt
processing, logits of the last position) against gpt2kern's optimized forward with `logits_to_keep=1` (and, for
reference, fp32 with every position's logits as HF computes them). Reported: median over the rounds, each against
its paired llama.cpp file and against gpt2kern fp32.

Error (with `--llama-perplexity`): mean KL(p_HF-fp32 ‖ p) and same top-1 — llama.cpp's measures — on the same
token ids and positions for every engine. `llama-perplexity --kl-divergence-base` on each file tokenizes --text
(default: the repo's README.md, bench/RESULTS.md and the tokenizer's LICENSE, concatenated) into --chunks chunks of
512 tokens, scores the second half of each chunk and stores those positions' log-probs (16 bits each). The same ids
go through HF fp32 (the reference of gpt2kern's own error figures) into a base file in llama.cpp's format, and:
- llama-perplexity `--kl-divergence` scores each llama.cpp file against it (its report has 6 decimals); gpt2kern's
  modes get the same formula;
- every engine's log-probs rounded as llama-perplexity stores them (llama.cpp's from its files above, gpt2kern's
  by the same rounding) against HF's exact ones, in float64 — the like-for-like column, finer than 1e-6;
- gpt2kern's logits exactly (`gpt2kern.cli.accuracy.logit_error`).
llama.cpp's f16/q8_0 against its own f32 (its usual protocol) are reported too.
"""
import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PAIR = {"fp32": "f32", "fp16": "f16", "bf16": "f16", "int8": "q8_0"}  # gpt2kern mode -> llama.cpp file of its width
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = ["README.md", "bench/RESULTS.md", "gpt2kern/tokenizer/LICENSE"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", "--gguf-f32", dest="gguf_f32", help="the f32 GGUF (--gguf is the older name)")
    ap.add_argument("--gguf-f16")
    ap.add_argument("--gguf-q8_0", dest="gguf_q8_0")
    ap.add_argument("--weights", nargs="+", choices=list(PAIR), help="gpt2kern modes (default: fp32 and those "
                    "whose llama.cpp file was given)")
    ap.add_argument("--model", default="random:distilgpt2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--llama-perplexity", help="llama-perplexity binary: adds the error comparison")
    ap.add_argument("--text", help="text for the error comparison (default: the repo's README, RESULTS, LICENSE)")
    ap.add_argument("--chunks", type=int, default=8, help="512-token chunks of --text for the error comparison")
    ap.add_argument("--no-speed", action="store_true", help="the error comparison only")
    ap.add_argument("--json", dest="json_file")
    a = ap.parse_args(argv)
    files = {k: v for k, v in (("f32", a.gguf_f32), ("f16", a.gguf_f16), ("q8_0", a.gguf_q8_0)) if v}
    checks = [("--llama-bench", a.llama_bench)] + [(f"--gguf-{k}", v) for k, v in files.items()]
    if a.llama_perplexity:
        checks.append(("--llama-perplexity", a.llama_perplexity))
    if a.text:
        checks.append(("--text", a.text))
    if "f32" not in files:
        print("error: --gguf (or --gguf-f32) is required", file=sys.stderr)
        return 2
    for what, path in checks:
        if not os.path.isfile(path):
            print(f"error: {what} {path!r} is not a file", file=sys.stderr)
            return 2
    if a.rounds < 1:
        print(f"error: --rounds must be >= 1, got {a.rounds}", file=sys.stderr)
        return 2
    if a.no_speed and not a.llama_perplexity:
        print("error: --no-speed leaves nothing to do without --llama-perplexity", file=sys.stderr)
        return 2
    if a.chunks < 2:
        print(f"error: --chunks must be >= 2, got {a.chunks}", file=sys.stderr)
        return 2
    modes = a.weights or [m for m in PAIR if PAIR[m] in files]
    if "fp32" not in modes:
        modes = ["fp32"] + modes
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import gpt2kern
    from gpt2kern import ops

    torch.set_num_threads(a.threads)
    model, tok = gpt2kern.load(a.model)
    opts = {m: gpt2kern.optimize(copy.deepcopy(model), weights=m) for m in modes}
    out = dict(model=a.model, gguf=files, threads=a.threads, rounds=a.rounds, weights=modes, isa=ops.isa(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if not a.no_speed:
        out.update(speed(a, files, model, opts, out))
    if a.llama_perplexity:
        out["error"] = error(a, files, model, tok, opts)
    if a.json_file:
        with open(a.json_file, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def speed(a, files, model, opts, info):
    import torch

    import gpt2kern

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    commit = {}

    def llama(kind, args):
        r = subprocess.run([a.llama_bench, "-m", files[kind], "-t", str(a.threads), "-r", "1", "-o", "json"] + args,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"error: llama-bench failed: {r.stderr.strip().splitlines()[-1:]}")
        j = json.loads(r.stdout)[0]
        commit.setdefault("llama.cpp", j.get("build_commit"))
        return j["avg_ns"] / 1e9

    def decode(m):
        ids = torch.randint(0, V, (1, 1), generator=g)
        t = time.perf_counter()
        gpt2kern.generate(opts[m], ids, max_new_tokens=128, eos_token_id=[])
        return time.perf_counter() - t

    def prefill(m, T, keep):
        ids = torch.randint(0, V, (1, T), generator=g)
        with torch.no_grad():
            t = time.perf_counter()
            opts[m](ids, use_cache=False, logits_to_keep=keep)
            return time.perf_counter() - t

    # rows: each llama.cpp file, then the gpt2kern modes of its width; "pair" = the llama.cpp row to compare with
    pair = {}
    dec, pre = {}, {T: {} for T in a.prefill}
    for kind in files:
        dec[f"llama.cpp {kind} tg128"] = lambda kind=kind: llama(kind, ["-p", "0", "-n", "128"]) / 128
        for T in a.prefill:
            pre[T][f"llama.cpp {kind} pp{T}"] = lambda kind=kind, T=T: llama(kind, ["-p", str(T), "-n", "0"])
        for m in (m for m in opts if PAIR[m] == kind):
            dec[f"gpt2kern {m}"] = lambda m=m: decode(m) / 128
            pair[f"gpt2kern {m}"] = kind
            for T in a.prefill:
                pre[T][f"gpt2kern {m}"] = lambda m=m, T=T: prefill(m, T, 1)
    for m in (m for m in opts if PAIR[m] not in files):  # a mode without its file: no pair
        dec[f"gpt2kern {m}"] = lambda m=m: decode(m) / 128
        for T in a.prefill:
            pre[T][f"gpt2kern {m}"] = lambda m=m, T=T: prefill(m, T, 1)
    for T in a.prefill:
        pre[T]["gpt2kern fp32 (all logits)"] = lambda T=T: prefill("fp32", T, 0)
    plan = {"decode, ms/token": dec, **{f"prefill T={T}, ms": pre[T] for T in a.prefill}}
    for fns in plan.values():  # warm-up
        for f in fns.values():
            f()
    times = {m: {k: [] for k in fns} for m, fns in plan.items()}
    for _ in range(a.rounds):
        for m, fns in plan.items():
            for k, f in fns.items():
                times[m][k].append(f())
    res = {m: {k: 1e3 * statistics.median(v) for k, v in row.items()} for m, row in times.items()}
    names = ", ".join(os.path.basename(f) for f in files.values())
    print(f"gpt2kern vs llama.cpp {commit.get('llama.cpp') or ''} ({names}), {a.model}, {a.threads} threads, "
          f"gpt2kern ISA {info['isa']}, median of {a.rounds} interleaved rounds, {info['date']}")
    print("prefill rows: last-position logits (llama-bench pp) unless marked; ratio > 1: the row is faster")
    for m, row in res.items():
        print(f"{m:<32} {'ms':>9}   vs llama.cpp same width   vs gpt2kern fp32")
        llama_row = {kind: next((v for k, v in row.items() if k.startswith(f"llama.cpp {kind} ")), None)
                     for kind in files}
        ours = row.get("gpt2kern fp32")
        for k, v in row.items():
            p = llama_row.get(pair.get(k))
            vs_l = f"{p / v:5.2f}x {pair[k]:<4}" if p and k in pair else " " * 11
            vs_o = f"{ours / v:5.2f}x" if ours and (k.startswith("llama.cpp") or "all logits" not in k) else ""
            print(f"  {k:<30} {v:9.2f}   {vs_l:<24} {vs_o}")
    return dict(results=res, llama_cpp_commit=commit.get("llama.cpp"))


def run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:]
        raise SystemExit(f"error: {what} failed: {tail}")
    return r.stdout + r.stderr


def parse_kld(text):
    """Mean KLD and same-top-1 fraction from llama-perplexity --kl-divergence's report."""
    kld = re.search(r"Mean\s+KLD:\s*([-\d.eE+]+)", text)
    top = re.search(r"Same top p:\s*([-\d.eE+]+)", text)
    if not (kld and top):
        raise SystemExit("error: llama-perplexity printed no 'Mean KLD' / 'Same top p'")
    return dict(mean_kld=float(kld.group(1)), top1_agreement=float(top.group(1)) / 100)


def read_base(path):
    """(n_ctx, n_vocab, n_chunk, tokens [n_chunk, n_ctx], log-prob records [n_chunk, n_ctx - 1 - n_ctx/2, nv]) of
    llama-perplexity's --kl-divergence-base file (the records: see base_record)."""
    import numpy as np

    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"error: {path} is not a llama-perplexity logits file")
        n_ctx, = np.frombuffer(f.read(4), np.uint32)
        n_vocab, n_chunk = np.frombuffer(f.read(8), np.int32)
    n_ctx, n_vocab, n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
    tokens = np.memmap(path, np.int32, "r", 20, (n_chunk, n_ctx))
    nv = 2 * ((n_vocab + 1) // 2) + 4
    recs = np.memmap(path, np.uint16, "r", 20 + 4 * n_ctx * n_chunk, (n_chunk, n_ctx - 1 - n_ctx // 2, nv))
    return n_ctx, n_vocab, n_chunk, np.array(tokens), recs


def base_record(logits):
    """llama-perplexity's stored form of log-probs [n, V] (its log_softmax with a uint16 output): per row a float32
    scale and min log-prob, then V uint16 steps over the top 16 nats (padded to an even count)."""
    import numpy as np
    import torch

    z = logits.float()
    n, V = z.shape
    mx, mn = z.max(-1).values, z.min(-1).values
    mn = torch.maximum(mn, mx - 16)
    lse = torch.log(torch.exp(z.double() - mx[:, None].double()).sum(-1)).float()
    scale = (mx - mn) / 65535.0
    q = torch.where(z > mn[:, None], torch.round((z - mn[:, None]) / scale.clamp_min(1e-30)[:, None]), torch.zeros(()))
    nv = 2 * ((V + 1) // 2) + 4
    rec = np.zeros((n, nv), np.uint16)
    head = np.zeros((n, 2), np.float32)
    head[:, 0], head[:, 1] = scale.numpy(), (mn - mx - lse).numpy()
    rec[:, :4] = head.view(np.uint16)
    rec[:, 4:4 + V] = q.numpy().astype(np.uint16)
    return rec


def log_probs(rec, V):
    """The log-probs [n, V] (float64) that records hold."""
    import numpy as np
    import torch

    head = np.ascontiguousarray(rec[:, :4]).view(np.float32)
    return torch.from_numpy(head[:, :1] * np.asarray(rec[:, 4:4 + V], np.float32) + head[:, 1:2]).double()


def llama_formula(rec, logits):
    """llama-perplexity's KL(base || q) and same-top over rows, base in its stored form, q from logits [n, V]."""
    import torch

    lpb = log_probs(rec, logits.shape[-1])
    lq = torch.log_softmax(logits.double(), -1)
    kld = torch.where(lpb > -16, lpb.exp() * (lpb - lq), torch.zeros(())).sum(-1)
    return kld, (lpb.argmax(-1) == logits.argmax(-1)).double()


def error(a, files, model, tok, opts):
    with tempfile.TemporaryDirectory(prefix="gk_llama_err_") as tmp:  # ~200 MB per file and 8 chunks
        return _error(a, files, model, tok, opts, tmp)


def _error(a, files, model, tok, opts, tmp):
    import numpy as np
    import torch

    from gpt2kern.cli.accuracy import logit_error

    text = a.text
    if not text:
        text = os.path.join(tmp, "text.txt")
        with open(text, "w") as f:
            for p in DEFAULT_TEXT:
                with open(os.path.join(REPO, p)) as g:
                    f.write(g.read() + "\n")
    common = [a.llama_perplexity, "-t", str(a.threads), "-c", "512", "-b", "512"]
    own = {}  # each llama.cpp file's own log-probs on the text (16-bit records), the f32 one also its KLD base
    for kind, path in files.items():
        own[kind] = os.path.join(tmp, f"llama-{kind}.kld")
        run(common + ["-m", path, "-f", text, "--chunks", str(a.chunks), "--kl-divergence-base", own[kind]],
            "llama-perplexity --kl-divergence-base")
    n_ctx, n_vocab, n_chunk, tokens, _ = read_base(own["f32"])
    if n_chunk < a.chunks:
        raise SystemExit(f"error: --text gives {n_chunk} chunks of {n_ctx} tokens, {a.chunks} wanted")
    for kind in files:
        if not np.array_equal(read_base(own[kind])[3], tokens):
            raise SystemExit(f"error: llama.cpp's {kind} file tokenizes the text differently from its f32 file")
    bos = tok.bos_token_id if tok is not None else None
    add_bos = bos is not None and int(tokens[0, 0]) == bos  # llama.cpp puts its BOS first in each chunk, if any
    ids = torch.from_numpy(tokens.astype(np.int64))
    if add_bos:
        ids[:, 0] = bos
    same_tok = None
    if tok is not None:
        with open(text) as f:
            hf_ids = tok(f.read(), verbose=False)["input_ids"]
        flat = tokens.reshape(-1)[1 if add_bos else 0:].tolist()
        same_tok = hf_ids[:len(flat)] == flat
    first = n_ctx // 2
    pos = slice(first, n_ctx - 1)  # the positions llama-perplexity scores

    # HF fp32 on the same ids, written as a base file in llama-perplexity's format
    base_hf = os.path.join(tmp, "base-hf-fp32.kld")
    recs, ref = [], []
    with torch.no_grad(), open(base_hf, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([n_ctx], np.uint32).tobytes() + np.array([n_vocab, n_chunk], np.int32).tobytes())
        f.write(tokens.astype(np.int32).tobytes())
        for c in range(n_chunk):
            z = model(ids[c:c + 1]).logits[0]
            if z.shape[-1] != n_vocab:
                raise SystemExit(f"error: the GGUF has {n_vocab} tokens, {a.model} {z.shape[-1]}")
            ref.append(z[pos].clone())
            recs.append(base_record(ref[-1]))
            f.write(recs[-1].tobytes())
    ref_all = torch.cat(ref)

    res = {}
    for kind, path in files.items():  # llama.cpp against HF fp32: its tool, and its own log-probs exactly
        r = parse_kld(run(common + ["-m", path, "--kl-divergence-base", base_hf, "--kl-divergence"],
                          "llama-perplexity --kl-divergence"))
        e = logit_error(ref_all, torch.cat([log_probs(x, n_vocab) for x in read_base(own[kind])[4]]))
        res[f"llama.cpp {kind}"] = dict(tool_mean_kld=r["mean_kld"], tool_top1=r["top1_agreement"],
                                        mean_kld=e["mean_kld"], top1_agreement=e["top1_agreement"])
    for m, opt in opts.items():  # gpt2kern on the same positions: the tool's formula, 16-bit log-probs, exactly
        zs, klds, sames = [], [], []
        with torch.no_grad():
            for c in range(n_chunk):
                zs.append(opt(ids[c:c + 1], use_cache=False).logits[0][pos].clone())
                k, s = llama_formula(recs[c], zs[-1])
                klds.append(k)
                sames.append(s)
        e16 = logit_error(ref_all, torch.cat([log_probs(base_record(z), n_vocab) for z in zs]))
        e = logit_error(ref_all, torch.cat(zs))
        res[f"gpt2kern {m}"] = dict(tool_mean_kld=torch.cat(klds).mean().item(),
                                    tool_top1=torch.cat(sames).mean().item(), mean_kld=e16["mean_kld"],
                                    top1_agreement=e16["top1_agreement"], exact_mean_kld=e["mean_kld"],
                                    exact_top1=e["top1_agreement"], rel_l2=e["rel_l2"])
    vs_own = {}
    for kind in (k for k in files if k != "f32"):  # llama.cpp's usual protocol: against its own f32
        vs_own[f"llama.cpp {kind}"] = parse_kld(run(common + ["-m", files[kind], "--kl-divergence-base", own["f32"],
                                                              "--kl-divergence"], "llama-perplexity --kl-divergence"))
    n_pos = n_chunk * (n_ctx - 1 - first)
    src = "--text " + os.path.basename(text) if a.text else "the default text"
    same = {None: "", True: ", equal to the HF tokenizer's", False: ", NOT equal to the HF tokenizer's"}[same_tok]
    print(f"error vs HF fp32 — {n_chunk} chunks of {n_ctx} tokens of {src} (llama.cpp's tokenization{same}), "
          f"positions {first}..{n_ctx - 2} of each ({n_pos} in all)")
    print(f"  {'':<16} {'llama-perplexity':>22}   {'16-bit log-probs':>22}   {'exact (float64)':>29}")
    print(f"  {'':<16} {'mean KLD':>10} {'same top':>11}   {'mean KLD':>10} {'same top':>11}   "
          f"{'mean KLD':>10} {'same top':>10} {'rel L2':>7}")
    for k, r in res.items():
        ex = (f"   {r['exact_mean_kld']:10.3g} {100 * r['exact_top1']:9.2f}% {r['rel_l2']:7.2g}"
              if "exact_mean_kld" in r else "")
        print(f"  {k:<16} {r['tool_mean_kld']:10.3g} {100 * r['tool_top1']:10.2f}%   {r['mean_kld']:10.3g} "
              f"{100 * r['top1_agreement']:10.2f}%{ex}")
    print("  llama-perplexity: its --kl-divergence against HF fp32 written as its base file (6 decimals; for gpt2kern"
          "\n  the same formula); 16-bit log-probs: KL(HF fp32 || each engine's log-probs as llama-perplexity stores"
          "\n  them), the same rounding for every engine; exact: gpt2kern's logits in float64")
    if vs_own:
        print("llama.cpp against its own f32 (its usual --kl-divergence protocol, same ids)")
        for k, r in vs_own.items():
            print(f"  {k:<16} {r['mean_kld']:10.3g} {100 * r['top1_agreement']:10.2f}%")
    return dict(vs_hf_fp32=res, llama_vs_own_f32=vs_own, text=text if a.text else DEFAULT_TEXT, chunks=n_chunk,
                n_ctx=n_ctx, positions=n_pos, tokens_equal_hf_tokenizer=same_tok, add_bos=add_bos)


if __name__ == "__main__":
    sys.exit(main())
