"""The per-GPU prefill variant defaults (gpt2kern/kernels/cuda_table.py) without a GPU: read from the table for a
fake device name, applied through a monkeypatched ops.cuda_variant once per process when weights are packed on a
CUDA device, a variant the caller chose kept, a GPU not listed or a variant this build lacks left alone."""
import types

import pytest
import torch


class FakeKnobs:
    def __init__(self, ops):
        self.ops, self.hi = ops, dict(prefill_gemm=3, prefill_attention=2)
        self.value = dict(prefill_gemm=2, prefill_attention=1)
        self.calls = []

    def __call__(self, name, value=0):
        if name not in self.hi:
            raise ValueError(f"name must be one of {', '.join(self.hi)}")
        if value > 0:
            if not 1 <= value <= self.hi[name]:
                raise ValueError(f"{name} has variants 1 to {self.hi[name]}, got {value}")
            self.calls.append((name, value))
            self.value[name] = value
            self.ops._chosen.add(name)  # as the real one does
        return self.value[name]


@pytest.fixture
def knobs(monkeypatch):
    return fake_knobs(monkeypatch)


def fake_knobs(monkeypatch) -> FakeKnobs:
    """ops.cuda_variant faked (prefill_gemm 1-3, attention 1-2; now 2 and 1), nothing chosen, the table not yet
    applied in this process, and the GPU named "Fake GPU"."""
    from gpt2kern.kernels import cuda_table, ops
    fake = FakeKnobs(ops)
    monkeypatch.setattr(ops, "cuda_variant", fake)
    monkeypatch.setattr(ops, "_chosen", set())
    monkeypatch.setattr(cuda_table, "_applied", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return fake


def test_prefill_defaults_are_applied_for_this_gpu(knobs, monkeypatch):
    from gpt2kern.kernels import cuda_table, ops
    table = {"Fake GPU": dict(by_batch={}, prefill=dict(prefill_gemm=3, prefill_attention=2)),
             "Other GPU": dict(by_batch={}, prefill=dict(prefill_gemm=1))}
    assert cuda_table.apply_prefill_defaults("Unlisted GPU", table) == {} and knobs.calls == []
    assert cuda_table.apply_prefill_defaults("Fake GPU", table) == dict(prefill_gemm=3, prefill_attention=2)
    assert knobs.calls == [("prefill_gemm", 3), ("prefill_attention", 2)]
    assert ops.chosen_cuda_variants() == frozenset()  # defaults, not the caller's choices
    # a variant this build does not have (a newer table) and a name it does not know: the rest is applied
    knobs.calls.clear()
    newer = {"Fake GPU": dict(prefill=dict(prefill_gemm=9, prefill_attention=1, prefill_other=2, bad=True))}
    assert cuda_table.apply_prefill_defaults("Fake GPU", newer) == dict(prefill_attention=1)
    assert knobs.value == dict(prefill_gemm=3, prefill_attention=1)
    # what the caller set is kept
    knobs.calls.clear()
    ops.cuda_variant("prefill_gemm", 1)
    assert ops.chosen_cuda_variants() == {"prefill_gemm"}
    assert cuda_table.apply_prefill_defaults("Fake GPU", table) == dict(prefill_attention=2)
    assert knobs.value == dict(prefill_gemm=1, prefill_attention=2)
    # the packaged table reads, and a GPU without a "prefill" entry sets nothing
    assert cuda_table.prefill_defaults("NVIDIA H200") == cuda_table.load()["NVIDIA H200"].get("prefill", {})
    assert cuda_table.prefill_defaults("Fake GPU", {"Fake GPU": dict(by_batch={})}) == {}


def test_apply_once_per_process_for_the_device_name(knobs, monkeypatch):
    from gpt2kern.kernels import cuda_table
    table = {"Fake GPU": dict(prefill=dict(prefill_gemm=3))}
    monkeypatch.setattr(cuda_table, "load", lambda path=None: table)
    assert cuda_table.apply_once(torch.device("cuda", 0)) == dict(prefill_gemm=3)
    table["Fake GPU"]["prefill"] = dict(prefill_gemm=1)
    assert cuda_table.apply_once(torch.device("cuda", 0)) == dict(prefill_gemm=3)  # once
    assert knobs.calls == [("prefill_gemm", 3)]
    # an unreadable table keeps the compiled-in defaults
    monkeypatch.setattr(cuda_table, "_applied", None)
    monkeypatch.setattr(cuda_table, "load", lambda path=None: (_ for _ in ()).throw(OSError("gone")))
    assert cuda_table.apply_once(torch.device("cuda", 0)) == {}


def test_packing_weights_on_cuda_applies_them(monkeypatch):
    # State._repack (optimize(), CudaGraphDecoder's and generate's packs) calls apply_once with the parameters'
    # CUDA device; CPU packs do not
    from gpt2kern.kernels import cuda_table, ops
    from gpt2kern.model import dropin
    seen = []
    monkeypatch.setattr(cuda_table, "apply_once", lambda device: seen.append(device))
    monkeypatch.setattr(ops, "has_cuda", lambda: True)
    st = dropin.State.__new__(dropin.State)
    st.transformer = st.lm_head = None
    st.pack, st.mode = False, "fp32"
    fake = types.SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.float16)  # not packable: no kernels
    st._repack([fake], "config reason")
    assert seen == [torch.device("cuda", 1)] and st.device == torch.device("cuda", 1) and st.weights is None
    st._repack([types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16)], "config reason")
    assert len(seen) == 1
