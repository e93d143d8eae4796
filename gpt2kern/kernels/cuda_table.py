"""The measured per-GPU defaults (gpt2kern/decode/cuda_variants.json, written by bench/gpu_bench.py): the prefill
kernels' numbered variants applied process-wide through ops.cuda_variant when gpt2kern first packs a model's weights
on a CUDA GPU. (The decoder's variants in the same table: decode/cuda_graph.py.)

A GPU entry may hold {"prefill": {"prefill_gemm": g, "prefill_attention": a}} (gpu_bench.py --sizes: the fastest
pair whose T=1024 logits are within 1e-4 of HF eager). A GPU not in the table, a name this build does not know and a
variant it does not have keep the compiled-in defaults; a variant the caller set through ops.cuda_variant is kept.
The knobs are process-wide: the first CUDA GPU whose weights gpt2kern packs in a process decides (once).
"""
from __future__ import annotations

import json
import os

from . import ops

TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "decode", "cuda_variants.json")

_applied: dict | None = None  # what apply_once set in this process ({} when nothing); None: not yet called


def load(path: str | None = None) -> dict:
    """The table's GPU entries: {gpu name: {"by_batch": ..., "prefill": ..., "measured": how}}."""
    with open(path or TABLE) as f:
        return json.load(f)["gpus"]


def prefill_defaults(gpu: str, table: dict | None = None) -> dict:
    """The table's prefill variants for `gpu` ({name: variant}; names this build does not know and values that are
    not positive ints are left out); {} for a GPU not in the table."""
    entry = (load() if table is None else table).get(gpu) or {}
    got = entry.get("prefill") or {}
    return {k: v for k, v in got.items()
            if k in ops.CUDA_VARIANTS and isinstance(v, int) and not isinstance(v, bool) and v >= 1}


def apply_prefill_defaults(gpu: str, table: dict | None = None) -> dict:
    """Set the table's prefill variants for `gpu` through ops.cuda_variant, except those the caller chose
    (ops.chosen_cuda_variants) and those this build refuses (ValueError: a table from a newer gpt2kern); returns
    {name: variant} of what was set."""
    done = {}
    for name, v in prefill_defaults(gpu, table).items():
        if name in ops.chosen_cuda_variants():
            continue
        try:
            ops.cuda_variant(name, v)
        except ValueError:
            continue
        ops.forget_chosen_cuda_variant(name)  # a default, not the caller's choice
        done[name] = v
    return done


def apply_once(device) -> dict:
    """apply_prefill_defaults for the GPU `device` (a torch.device of type cuda) the first time gpt2kern packs
    weights on a CUDA GPU in this process; later calls return what that one set. A missing or unreadable table
    keeps the compiled-in defaults."""
    global _applied
    if _applied is None:
        import torch

        _applied = {}  # set first: an error below is not retried on every repack
        try:
            _applied = apply_prefill_defaults(torch.cuda.get_device_name(device))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
            pass
    return _applied
