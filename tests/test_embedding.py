import pytest
import torch

from gpt2kern import ops


def test_embedding_matches_gather(isa):
    wte, wpe = torch.randn(99, 32), torch.randn(512, 32)
    ids = torch.randint(0, 99, (3, 7))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]])
    assert torch.equal(ops.embedding(ids, wte, wpe, pos), wte[ids] + wpe[pos])
    tt = torch.randint(0, 99, (3, 7))
    assert torch.equal(ops.embedding(ids, wte, wpe, pos, tt), (wte[ids] + wpe[pos]) + wte[tt])
    assert torch.equal(ops.embedding(ids, wte, wpe, pos[:1]), wte[ids] + wpe[pos[:1]])  # broadcast positions
    assert torch.equal(ops.embedding(ids.int(), wte, wpe, pos), wte[ids] + wpe[pos])


def test_opcheck():
    wte, wpe = torch.randn(99, 32), torch.randn(16, 32)
    torch.library.opcheck(torch.ops.gpt2kern.embedding, (torch.randint(0, 99, (2, 3)), wte, wpe,
                                                         torch.arange(3)[None], None))


def test_bad_ids():
    wte, wpe = torch.randn(99, 32), torch.randn(16, 32)
    pos = torch.arange(3)[None]
    with pytest.raises(IndexError, match=r"input_ids contains 99, outside the vocabulary \[0, 99\)"):
        ops.embedding(torch.tensor([[1, 99, 2]]), wte, wpe, pos)
    with pytest.raises(IndexError, match="contains -1"):
        ops.embedding(torch.tensor([[1, -1, 2]]), wte, wpe, pos)
    with pytest.raises(IndexError, match="position_ids contains 16"):
        ops.embedding(torch.tensor([[1, 2, 3]]), wte, wpe, torch.tensor([[14, 15, 16]]))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        ops.embedding(torch.ones(1, 3), wte, wpe, pos)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        ops.embedding(torch.ones(1, 3, dtype=torch.long), wte, wpe, torch.arange(4)[None])
