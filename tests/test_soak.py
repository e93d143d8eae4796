"""Soak, short: some 60 generate calls per entry point (every one in generators.GENERATORS) and 1,000 decode steps
with resident memory flat after warm-up. The long version (1,000 calls, 10,000 steps) is scripts/soak.py, by hand."""
import copy
import gc
import os
import sys

import pytest

import gpt2kern

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import soak  # noqa: E402
from generators import GENERATORS  # noqa: E402

MAX_DRIFT_MB = 50  # loose: allocator caches and Python's own arenas move a few MiB either way


@pytest.fixture(scope="module")
def model(tiny):
    return gpt2kern.optimize(copy.deepcopy(tiny))


@pytest.mark.parametrize("gen_name", list(GENERATORS))
def test_generate_memory_flat(model, gen_name):
    calls = 60 if gen_name != "hf_beam2" else 30
    start, end, tokens, secs = soak.soak_generate(model, gen_name, calls=calls, warmup=10, max_new=10)
    print(f"{gen_name}: {calls} calls, {tokens} tokens, {secs:.1f}s, RSS {start:.1f} -> {end:.1f} MiB")
    assert end - start <= MAX_DRIFT_MB
    assert gpt2kern.fallback_reason(model) is None


def test_decode_memory_flat(model):
    start, end, secs = soak.soak_decode(model, steps=1000, warmup=50)
    gc.collect()
    print(f"decode: 1000 steps, {secs:.1f}s, RSS {start:.1f} -> {end:.1f} MiB")
    assert end - start <= MAX_DRIFT_MB
