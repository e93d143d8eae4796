"""Soak: many generate calls of varying batch sizes and lengths, then many single-token decode steps, printing the
resident memory (RSS) at the start and end of each phase. Memory must stay flat: packed weights, caches and
kernel scratch are either reused or freed.

    python scripts/soak.py                         # 1,000 generate calls + 10,000 decode steps, random:distilgpt2
    python scripts/soak.py --model random:tiny --calls 200 --decode-steps 1000 --max-drift-mb 50   # (the CI test)

Each generation entry point of tests/generators.py GENERATORS is soaked in turn (--gen to pick one).
Exit status 1 if --max-drift-mb is given and a phase's RSS grew more than that after warm-up.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from generators import GENERATORS, footprint, jobs, rss_mb  # noqa: E402

import gpt2kern  # noqa: E402
from gpt2kern.model.dropin import _CACHE_ARG  # noqa: E402  (past_key_values, or cache in newer transformers)


def soak_generate(model, gen_name, calls, warmup, seed=0, max_new=24):
    gen = GENERATORS[gen_name](model)
    work = jobs(calls + warmup, model.config.vocab_size, seed=seed, max_batch=4, max_prompt=48, max_new=max_new)
    for job in work[:warmup]:
        gen(*job)
    start = footprint()
    t0, tokens = time.perf_counter(), 0
    for job in work[warmup:]:
        tokens += gen(*job).numel()
    return start, footprint(), tokens, time.perf_counter() - t0


def soak_decode(model, steps, warmup):
    """Single-token decode steps through the model's forward with a DynamicCache, a new cache (and prompt) each
    time the positions run out."""
    n_pos, vocab = model.config.n_positions, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    state = {}

    def step():
        with torch.no_grad():
            if state.get("cache") is None or state["cache"].get_seq_length() >= n_pos - 1:
                out = model(torch.randint(0, vocab, (1, 8), generator=g), use_cache=True)
            else:
                out = model(state["tok"], use_cache=True, **{_CACHE_ARG: state["cache"]})
        state["cache"] = getattr(out, "cache", None) or out.past_key_values
        state["tok"] = out.logits[:, -1:].argmax(-1)

    for _ in range(warmup):
        step()
    state.clear()  # each phase starts and ends without a cache
    start = footprint()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    state.clear()
    return start, footprint(), time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:distilgpt2")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--decode-steps", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--gen", choices=list(GENERATORS), action="append", help="entry points to soak (default all)")
    ap.add_argument("--max-drift-mb", type=float, default=None)
    a = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore")
    model, _ = gpt2kern.load(a.model)
    model = gpt2kern.optimize(copy.deepcopy(model))
    print(f"soak {a.model}: RSS at start {rss_mb():.1f} MiB", flush=True)
    drifts = {}

    def show(what, s, e):
        d = {k: e[k] - s[k] for k in s if s[k] is not None}
        drifts[what] = d["rss_mb"]
        heap = f"; heap {s['heap_mb']:.1f} -> {e['heap_mb']:.1f} MiB" if s["heap_mb"] is not None else ""
        return (f"RSS {s['rss_mb']:.1f} -> {e['rss_mb']:.1f} MiB (drift {d['rss_mb']:+.1f}){heap}; "
                f"live tensors {s['tensors']} -> {e['tensors']}")

    for name in a.gen or list(GENERATORS):
        s, e, toks, dt = soak_generate(model, name, a.calls, a.warmup)
        print(f"{name}: {a.calls} calls, {toks} tokens in {dt:.1f}s; {show(name, s, e)}", flush=True)
    if a.decode_steps:
        s, e, dt = soak_decode(model, a.decode_steps, a.warmup)
        print(f"decode: {a.decode_steps} steps in {dt:.1f}s ({1000 * dt / a.decode_steps:.2f} ms/step); "
              f"{show('decode', s, e)}", flush=True)
    if a.max_drift_mb is not None and any(d > a.max_drift_mb for d in drifts.values()):
        print(f"FAIL: RSS drift over {a.max_drift_mb} MiB: {drifts}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
