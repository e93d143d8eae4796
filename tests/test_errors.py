"""Bad input to the optimized model: a clear exception naming the problem, never a crash or a wrong answer."""
import copy

import pytest
import torch

import gpt2kern


@pytest.fixture(autouse=True)
def _no_grad():  # the fast path's own checks (a call that needs autograd is HF's, with HF's errors)
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def opt():
    m, _ = gpt2kern.load("random:tiny")
    return gpt2kern.optimize(copy.deepcopy(m))


def test_token_id_out_of_range(opt):
    with pytest.raises(IndexError, match=r"input_ids contains 99, outside the vocabulary \[0, 99\)"):
        opt(torch.tensor([[1, 99]]))
    with pytest.raises(IndexError, match="contains -3"):
        opt(torch.tensor([[-3, 1]]))


def test_sequence_longer_than_n_positions(opt):
    with pytest.raises(ValueError, match="exceeds n_positions=512"):
        opt(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(IndexError, match="position_ids contains 512"):
        opt(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[511, 512]]))


def test_wrong_dtype(opt):
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        opt(torch.zeros(1, 3))


def test_empty_batch(opt):
    with pytest.raises(ValueError, match="batch >= 1 and seq_len >= 1"):
        opt(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch >= 1 and seq_len >= 1"):
        opt(torch.zeros(2, 0, dtype=torch.long))


def test_bad_masks(opt):
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must be"):
        opt(ids, attention_mask=torch.ones(3, 1, 3))  # (a [2, 1, 4] one is fine: HF views it as [batch, -1])
    with pytest.raises(ValueError, match="attention_mask covers 3 positions"):
        opt(ids, attention_mask=torch.ones(2, 3))


def test_wrong_device_goes_to_hf_path(opt):
    # tensors the CPU kernels cannot read are never fed to them: HF's path handles (and judges) the call
    opt(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert gpt2kern.fallback_reason(opt) == "input_ids on meta, model on cpu"
