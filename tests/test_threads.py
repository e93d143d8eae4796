"""Threads: the kernels' results do not depend on how many threads split the work (chunks are taken from a shared
counter, csrc/cpu/parallel.h), and a decode step's thread cap (gpt2kern.generate's ThreadChooser) changes the speed,
never the numbers, nor torch's setting."""
import pytest
import torch
from conftest import plant_outliers

from gpt2kern import ops


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("M", [1, 2, 7, 130])
def test_results_are_the_same_at_any_thread_count(isa, threads, M):
    g = torch.Generator().manual_seed(M)
    x = plant_outliers(torch.randn(M, 96 * 3, generator=g))
    w, b = torch.randn(96 * 3, 200, generator=g), torch.randn(200, generator=g)
    q, k, v = (torch.randn(2, 3, M, 16, generator=g) for _ in range(3))
    out = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        out.append((ops.conv1d(x, ops.pack(w), b, "gelu_new", out_features=200, layout="panels"),
                    ops.conv1d(x, w, b, "gelu_new", out_features=200),  # HF's layout in place (split-K decode)
                    ops.attention(q, k, v, None, None, 0.25, 0, True)))
    for o in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, out[0]))


def test_engine_steps_at_a_thread_cap_give_the_same_logits(tiny, threads):
    from gpt2kern.model.dropin import state_of

    torch.set_num_threads(2)
    W = state_of(tiny).weights
    ids, pos, valid = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)
    out = []
    for cap in (0, 1, 2):
        eng = W.engine(1, 8, 3)
        eng.forward(ids, pos, valid, cap)
        out.append(eng.forward(torch.tensor([[9]]), torch.tensor([[3]]), valid[:, :1], cap).clone())
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.get_num_threads() == 2  # the cap never touches torch's setting
    with pytest.raises(ValueError, match="threads must be >= 0"):
        W.engine(1, 8, 3).forward(ids, pos, valid, -1)


def test_thread_chooser_takes_the_faster_and_tries_again(threads):
    from gpt2kern.decode.generate import ThreadChooser

    torch.set_num_threads(2)
    c = ThreadChooser(every=4)
    picks = []
    for _ in range(40):  # one thread measures faster (a busy core): the chooser moves to it and stays
        t = c.pick()
        picks.append(t)
        c.record(t, 0.008 if t == 1 else 0.018)
    assert picks[:3] == [0, 0, 1] and picks[3:6] == [1, 1, 1]
    assert 2 in picks[6:] and picks[6:].count(1) >= 28  # tries torch's count again now and then, rarely
    c = ThreadChooser(every=4)
    picks = []
    for _ in range(300):  # a quiet machine: torch's count wins; the tries of 1 thread thin out
        t = c.pick()
        picks.append(t)
        c.record(t, 0.008 if t == 1 else 0.005)
    assert picks.count(1) <= 8 and picks[-1] == 0
    c = ThreadChooser(every=4, first_try=8)  # a later first try: seven calls at torch's count first
    picks = [c.pick() for _ in range(8)]
    assert picks == [0] * 7 + [1]
    torch.set_num_threads(1)
    assert ThreadChooser().pick() == 0
