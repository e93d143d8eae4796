"""Threads: generating from several Python threads at once — one shared optimized model, or one model per thread —
gives exactly the tokens of sequential runs; one thread's fallback or repack never leaks into another's call.
(README "Thread safety" says what is and is not safe.)"""
import copy
import threading

import pytest
import torch
from generators import GENERATORS, jobs

import gpt2kern

N_THREADS = 4


@pytest.fixture(scope="module")
def base(tiny):
    return gpt2kern.optimize(copy.deepcopy(tiny))


def run_threads(target, n=N_THREADS):
    """Run target(thread_index) in n threads started together; re-raise the first exception."""
    barrier, errors = threading.Barrier(n), []

    def wrap(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("gen_name", list(GENERATORS))
@pytest.mark.parametrize("sharing", ["shared_model", "model_per_thread"])
def test_threads_give_sequential_tokens(base, gen_name, sharing):
    work = jobs(12, base.config.vocab_size, seed=1, max_new=8)
    make = GENERATORS[gen_name]
    expected = [make(base)(*job) for job in work]  # sequential, one thread
    models = [base] * N_THREADS if sharing == "shared_model" else \
        [gpt2kern.optimize(copy.deepcopy(base)) for _ in range(N_THREADS)]

    def worker(i):
        gen = make(models[i])
        for j in list(range(i, len(work))) + list(range(i)):  # every job, each thread starting elsewhere
            out = gen(*work[j])
            assert torch.equal(out, expected[j]), f"job {j}: {out.tolist()} != {expected[j].tolist()}"
        assert gpt2kern.fallback_reason(models[i]) is None

    run_threads(worker)


def test_fallback_in_one_thread_does_not_leak(base):
    """fallback_reason and the lm_head's path follow each thread's own call: a thread asking for attentions (HF's
    path) while others decode on the kernels sees its reason, and theirs stay fast and exact."""
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(ids).logits

    def worker(i):
        for _ in range(15):
            with torch.no_grad():
                out = base(ids, output_attentions=(i == 0))
            if i == 0:
                assert gpt2kern.fallback_reason(base) == "output_attentions"
                assert out.attentions is not None
            else:
                assert gpt2kern.fallback_reason(base) is None
                assert torch.equal(out.logits, want)

    run_threads(worker)


def test_concurrent_first_call_after_weight_change_repacks_once(tiny):
    """Weights changed, then several threads call at once: one repacks, all see the complete new packs (before
    the lock a thread could walk a half-built layer list)."""
    opt = gpt2kern.optimize(copy.deepcopy(tiny))
    ref = copy.deepcopy(tiny)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    for rnd in range(5):
        with torch.no_grad():
            for m in (opt, ref):
                m.transformer.h[rnd % 2].mlp.c_fc.weight.mul_(1.1)
            want = ref(ids).logits
        outs = [None] * N_THREADS

        def worker(i):
            with torch.no_grad():
                outs[i] = opt(ids).logits
            assert gpt2kern.fallback_reason(opt) is None

        run_threads(worker)
        for o in outs:
            assert torch.equal(o, outs[0])
            torch.testing.assert_close(o, want, atol=1e-4, rtol=1e-5)


def test_deepcopy_of_optimized_model(base):
    """An optimized model can be copied (its lock and per-thread state are recreated), and the copy is optimized."""
    twin = copy.deepcopy(base)
    assert gpt2kern.is_optimized(twin)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, base(ids).logits)
    assert gpt2kern.fallback_reason(twin) is None
