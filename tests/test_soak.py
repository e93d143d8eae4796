"""Soak, short: some 60 generate calls per entry point (every one in generators.GENERATORS) and 1,000 decode steps
with memory flat after warm-up: RSS (loosely), the C heap in use and the number of live tensors (tightly). The long
version (1,000 calls, 10,000 steps) is scripts/soak.py, by hand."""
import copy
import os
import sys

import pytest
import torch

import gpt2kern

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import soak  # noqa: E402
from generators import GENERATORS  # noqa: E402

MAX_RSS_DRIFT_MB = 50  # loose: allocator caches and Python's own arenas move a few MiB either way
MAX_HEAP_DRIFT_MB = 1.0  # tight: C heap bytes in use; a leaked KV cache per call (40 KiB at T=40) passes it
MAX_TENSOR_DRIFT = 2  # Python-held tensors after the run vs before (a leaked reference per call: dozens)


@pytest.fixture(scope="module")
def model(tiny):
    return gpt2kern.optimize(copy.deepcopy(tiny))


def check_flat(what, start, end):
    heap = f"{start['heap_mb']:.2f} -> {end['heap_mb']:.2f}" if start["heap_mb"] is not None else "n/a"
    print(f"{what}: RSS {start['rss_mb']:.1f} -> {end['rss_mb']:.1f} MiB, heap {heap} MiB, "
          f"tensors {start['tensors']} -> {end['tensors']}")
    assert end["rss_mb"] - start["rss_mb"] <= MAX_RSS_DRIFT_MB
    if start["heap_mb"] is not None:
        assert end["heap_mb"] - start["heap_mb"] <= MAX_HEAP_DRIFT_MB, f"{what}: C heap grew"
    assert end["tensors"] - start["tensors"] <= MAX_TENSOR_DRIFT, f"{what}: tensors left alive"


@pytest.mark.parametrize("gen_name", list(GENERATORS))
def test_generate_memory_flat(model, gen_name):
    calls = 60 if gen_name != "hf_beam2" else 30
    start, end, tokens, secs = soak.soak_generate(model, gen_name, calls=calls, warmup=10, max_new=10)
    check_flat(f"{gen_name}: {calls} calls, {tokens} tokens, {secs:.1f}s", start, end)
    assert gpt2kern.fallback_reason(model) is None


def test_decode_memory_flat(model):
    start, end, secs = soak.soak_decode(model, steps=1000, warmup=50)
    check_flat(f"decode: 1000 steps, {secs:.1f}s", start, end)


def test_the_soak_measures_would_see_a_leak(model):
    """The measures are sharp enough: holding one small cache-sized tensor per call over a soak's 60 calls is
    caught by both limits."""
    start, kept = soak.footprint(), []
    for _ in range(60):
        kept.append(torch.empty(2 * 2 * 80 * 32, dtype=torch.float32).fill_(1))  # tiny's KV cache, B=1, T=80
    end = soak.footprint()
    if start["heap_mb"] is not None:
        assert end["heap_mb"] - start["heap_mb"] > MAX_HEAP_DRIFT_MB
    assert end["tensors"] - start["tensors"] > MAX_TENSOR_DRIFT
