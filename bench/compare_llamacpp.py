"""gpt2kern vs llama.cpp on this machine, side by side, on the same weights.

    python bench/compare_llamacpp.py --llama-bench PATH/llama-bench --gguf distil-f32.gguf [--rounds 5] [--json F]

llama.cpp is not a dependency: build its `llama-bench` (cmake, GGML_NATIVE=ON, OpenMP) and convert the model with
its `convert_hf_to_gguf.py` (`--outtype f32`) from a `save_pretrained` directory of the same model (`--model`,
default random:distilgpt2; seed-fixed, so the weights match). Rounds alternate the two, so both see the same
machine: llama-bench `tg128` (128 tokens decoded from an empty context) against `gpt2kern.generate` from a 1-token
prompt, and llama-bench `pp128`/`pp512` (prompt processing, logits of the last position) against gpt2kern's
optimized forward with `logits_to_keep=1` (and, for reference, with every position's logits as HF computes them).
Reported: median over the rounds.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--model", default="random:distilgpt2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_file")
    a = ap.parse_args(argv)
    for what, path in (("--llama-bench", a.llama_bench), ("--gguf", a.gguf)):
        if not os.path.isfile(path):
            print(f"error: {what} {path!r} is not a file", file=sys.stderr)
            return 2
    if a.rounds < 1:
        print(f"error: --rounds must be >= 1, got {a.rounds}", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import gpt2kern

    torch.set_num_threads(a.threads)
    model, _ = gpt2kern.load(a.model)
    opt = gpt2kern.optimize(copy.deepcopy(model))
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def llama(args):
        r = subprocess.run([a.llama_bench, "-m", a.gguf, "-t", str(a.threads), "-r", "1", "-o", "json"] + args,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"error: llama-bench failed: {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout)[0]["avg_ns"] / 1e9

    def decode():
        ids = torch.randint(0, V, (1, 1), generator=g)
        t = time.perf_counter()
        gpt2kern.generate(opt, ids, max_new_tokens=128, eos_token_id=[])
        return time.perf_counter() - t

    def prefill(T, keep):
        ids = torch.randint(0, V, (1, T), generator=g)
        with torch.no_grad():
            t = time.perf_counter()
            opt(ids, use_cache=False, logits_to_keep=keep)
            return time.perf_counter() - t

    plan = {
        "decode, ms/token": {"llama.cpp tg128": lambda: llama(["-p", "0", "-n", "128"]) / 128,
                             "gpt2kern": lambda: decode() / 128},
        "prefill T=128, ms": {"llama.cpp pp128": lambda: llama(["-p", "128", "-n", "0"]),
                              "gpt2kern (last logits)": lambda: prefill(128, 1),
                              "gpt2kern (all logits)": lambda: prefill(128, 0)},
        "prefill T=512, ms": {"llama.cpp pp512": lambda: llama(["-p", "512", "-n", "0"]),
                              "gpt2kern (last logits)": lambda: prefill(512, 1),
                              "gpt2kern (all logits)": lambda: prefill(512, 0)},
    }
    for fns in plan.values():  # warm-up
        for f in fns.values():
            f()
    times = {m: {k: [] for k in fns} for m, fns in plan.items()}
    for _ in range(a.rounds):
        for m, fns in plan.items():
            for k, f in fns.items():
                times[m][k].append(f())
    res = {m: {k: 1e3 * statistics.median(v) for k, v in row.items()} for m, row in times.items()}
    print(f"gpt2kern vs llama.cpp ({os.path.basename(a.gguf)}), {a.model}, {a.threads} threads, "
          f"median of {a.rounds} interleaved rounds")
    for m, row in res.items():
        first = next(iter(row.values()))
        print(m)
        for k, v in row.items():
            print(f"  {k:<24} {v:9.2f}   {first / v:5.2f}x llama.cpp's speed")
    if a.json_file:
        with open(a.json_file, "w") as f:
            json.dump(dict(results=res, model=a.model, gguf=a.gguf, threads=a.threads, rounds=a.rounds,
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
