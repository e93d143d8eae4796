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
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from generators import GENERATORS, jobs, rss_mb  # noqa: E402

import gpt2kern  # noqa: E402
from gpt2kern.model import _CACHE_ARG  # noqa: E402  (past_key_values, or cache in newer transformers)


def soak_generate(model, gen_name, calls, warmup, seed=0, max_new=24):
    gen = GENERATORS[gen_name](model)
    work = jobs(calls + warmup, model.config.vocab_size, seed=seed, max_batch=4, max_prompt=48, max_new=max_new)
    for job in work[:warmup]:
        gen(*job)
    gc.collect()
    start = rss_mb()
    t0, tokens = time.perf_counter(), 0
    for job in work[warmup:]:
        tokens += gen(*job).numel()
    gc.collect()
    return start, rss_mb(), tokens, time.perf_counter() - t0


def soak_decode(model, steps, warmup):
    """Single-token decode steps through the model's forward with a DynamicCache, a new cache (and prompt) each
    time the positions run out."""
    n_pos, vocab = model.config.n_positions, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    state = {"cache": None, "tok": None}

    def step():
        with torch.no_grad():
            if state["cache"] is None or state["cache"].get_seq_length() >= n_pos - 1:
                out = model(torch.randint(0, vocab, (1, 8), generator=g), use_cache=True)
            else:
                out = model(state["tok"], use_cache=True, **{_CACHE_ARG: state["cache"]})
        state["cache"] = getattr(out, "cache", None) or out.past_key_values
        state["tok"] = out.logits[:, -1:].argmax(-1)

    for _ in range(warmup):
        step()
    gc.collect()
    start = rss_mb()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    state.clear()
    gc.collect()
    return start, rss_mb(), time.perf_counter() - t0


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
    for name in a.gen or list(GENERATORS):
        s, e, toks, dt = soak_generate(model, name, a.calls, a.warmup)
        drifts[name] = e - s
        print(f"{name}: {a.calls} calls, {toks} tokens in {dt:.1f}s; RSS {s:.1f} -> {e:.1f} MiB "
              f"(drift {e - s:+.1f})", flush=True)
    if a.decode_steps:
        s, e, dt = soak_decode(model, a.decode_steps, a.warmup)
        drifts["decode"] = e - s
        print(f"decode: {a.decode_steps} steps in {dt:.1f}s ({1000 * dt / a.decode_steps:.2f} ms/step); "
              f"RSS {s:.1f} -> {e:.1f} MiB (drift {e - s:+.1f})", flush=True)
    if a.max_drift_mb is not None and any(d > a.max_drift_mb for d in drifts.values()):
        print(f"FAIL: RSS drift over {a.max_drift_mb} MiB: {drifts}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
