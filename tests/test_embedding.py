import pytest
import torch
from conftest import DEVICES

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
    with pytest.raises(IndexError, match=r"input_ids contains 99, outside the vocabulary \[0, 99\)"):
        ops.embedding(t([[1, 99, 2]]), wte, wpe, pos)
    with pytest.raises(IndexError, match="contains -1"):
        ops.embedding(t([[1, -1, 2]]), wte, wpe, pos)
    with pytest.raises(IndexError, match="position_ids contains 16"):
        ops.embedding(t([[1, 2, 3]]), wte, wpe, t([[14, 15, 16]]))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        ops.embedding(torch.ones(1, 3, device=dev), wte, wpe, pos)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        ops.embedding(torch.ones(1, 3, dtype=torch.long, device=dev), wte, wpe, torch.arange(4, device=dev)[None])
