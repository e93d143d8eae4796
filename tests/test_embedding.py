import pytest
import torch
from conftest import DEVICES, needs_cuda

from gpt2kern import ops


def test_embedding_matches_gather(device):
    wte, wpe = torch.randn(99, 32, device=device), torch.randn(512, 32, device=device)
    ids = torch.randint(0, 99, (3, 7), device=device)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]], device=device)
    assert torch.equal(ops.embedding(ids, wte, wpe, pos), wte[ids] + wpe[pos])
    tt = torch.randint(0, 99, (3, 7), device=device)
    assert torch.equal(ops.embedding(ids, wte, wpe, pos, tt), (wte[ids] + wpe[pos]) + wte[tt])
    assert torch.equal(ops.embedding(ids, wte, wpe, pos[:1]), wte[ids] + wpe[pos[:1]])  # broadcast positions
    assert torch.equal(ops.embedding(ids.int(), wte, wpe, pos), wte[ids] + wpe[pos])


@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(dev):
    wte, wpe = torch.randn(99, 32, device=dev), torch.randn(16, 32, device=dev)
    torch.library.opcheck(torch.ops.gpt2kern.embedding, (torch.randint(0, 99, (2, 3), device=dev), wte, wpe,
                                                         torch.arange(3, device=dev)[None], None))


@pytest.mark.parametrize("dev", DEVICES)
def test_bad_ids(dev):
    wte, wpe = torch.randn(99, 32, device=dev), torch.randn(16, 32, device=dev)
    pos = torch.arange(3, device=dev)[None]

    def t(x):
        return torch.tensor(x, device=dev)

    def call(*args):  # CPU raises at once; CUDA checks on the device and raises when asked (no sync per call)
        out = ops.embedding(*args)
        if dev == "cuda":
            ops.check_cuda_errors()
        return out
    with pytest.raises(IndexError, match=r"input_ids contains 99, outside the vocabulary \[0, 99\)"):
        call(t([[1, 99, 2]]), wte, wpe, pos)
    with pytest.raises(IndexError, match="contains -1"):
        call(t([[1, -1, 2]]), wte, wpe, pos)
    with pytest.raises(IndexError, match="position_ids contains 16"):
        call(t([[1, 2, 3]]), wte, wpe, t([[14, 15, 16]]))
    with pytest.raises(IndexError, match="token_type_ids contains 120"):
        call(t([[1, 2, 3]]), wte, wpe, pos, t([[0, 120, 0]]))
    call(t([[1, 2, 3]]), wte, wpe, pos)  # a reported error is cleared
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        ops.embedding(torch.ones(1, 3, device=dev), wte, wpe, pos)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        ops.embedding(torch.ones(1, 3, dtype=torch.long, device=dev), wte, wpe, torch.arange(4, device=dev)[None])


@needs_cuda
def test_bad_ids_on_cuda_are_nan_rows_and_a_later_error():
    wte, wpe = torch.randn(99, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    pos = torch.arange(3, device="cuda")[None]
    out = ops.embedding(torch.tensor([[1, 99, 2]], device="cuda"), wte, wpe, pos)
    torch.cuda.synchronize()
    assert out[0, 1].isnan().all() and torch.equal(out[0, [0, 2]], (wte[[1, 2]] + wpe[[0, 2]]))
    with pytest.raises(IndexError, match="input_ids contains 99"):  # the next call, the kernel being done
        ops.embedding(torch.tensor([[1, 2, 3]], device="cuda"), wte, wpe, pos)
    ops.check_cuda_errors()  # reported once, then clear


@needs_cuda
def test_bad_ids_on_cuda_under_a_graph():
    # the captured kernel checks every replay's ids (its own test: compute-sanitizer's memcheck runs without the
    # caching allocator, where a capture cannot allocate, so gpu_check leaves graph tests out of it)
    wte, wpe = torch.randn(99, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    pos = torch.arange(3, device="cuda")[None]
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ops.embedding(ids, wte, wpe, pos)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = ops.embedding(ids, wte, wpe, pos)
    g.replay()
    ops.check_cuda_errors()
    assert torch.equal(y, wte[ids] + wpe[pos])
    ids.fill_(-5)
    g.replay()
    with pytest.raises(IndexError, match="input_ids contains -5"):
        ops.check_cuda_errors()
    assert y.isnan().all()
