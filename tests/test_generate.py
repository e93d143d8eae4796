"""gpt2kern.generate (the C++ decode engine) against HF's own generate: greedy, batches with left padding, eos per row,
seeded sampling, streamers, bad arguments, and the hand-back to HF for models the engine does not serve."""
import copy

import pytest
import torch

import gpt2kern
from gpt2kern.decode.generate import last_fallback_reason


def hf_generate(model, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, num_beams=1, **kw)


def left_padded(vocab, lengths, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, T - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[r, T - n:] = 1
    return ids, mask


def test_greedy_128_tokens_match_hf(distil):
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    out = gpt2kern.generate(distil, ids, max_new_tokens=128, eos_token_id=[])
    ref = hf_generate(distil, ids, max_new_tokens=128, eos_token_id=None, pad_token_id=0)
    assert last_fallback_reason() is None
    assert out.shape == (1, 16 + 128)
    assert torch.equal(out, ref)


def test_engine_does_not_touch_an_unoptimized_model(tiny):
    m = copy.deepcopy(tiny)
    gpt2kern.generate(m, torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert not gpt2kern.is_optimized(m) and m.lm_head.weight.requires_grad


def test_works_on_an_optimized_model_too(tiny):
    m = gpt2kern.optimize(copy.deepcopy(tiny))
    ids = torch.tensor([[5, 6, 7, 8]])
    out = gpt2kern.generate(m, ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out, hf_generate(tiny, ids, max_new_tokens=20, eos_token_id=None, pad_token_id=0))


@pytest.mark.parametrize("model_name", ["tiny", "distil"])
def test_left_padded_batch_matches_hf(model_name, request):
    model = request.getfixturevalue(model_name)
    V = model.config.vocab_size
    ids, mask = left_padded(V, [7, 3, 5, 1], pad=0)
    out = gpt2kern.generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
    ref = hf_generate(model, ids, mask, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)


def test_eos_stops_each_row_and_pads_like_hf(tiny):
    ids, mask = left_padded(99, [6, 4, 5], pad=0, seed=3)
    T = ids.shape[1]
    free = gpt2kern.generate(tiny, ids, mask, max_new_tokens=30, eos_token_id=[])[:, T:]

    def first(row, tok):
        hits = (free[row] == tok).nonzero()
        return int(hits[0]) if len(hits) else 99

    # an eos that the rows produce at different steps, so one row is padded while another still runs
    eos = next(int(t) for t in free[0] if len({first(r, int(t)) for r in range(3)}) > 1)
    out = gpt2kern.generate(tiny, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=97)
    ref = hf_generate(tiny, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=97)
    assert torch.equal(out, ref)
    r = min(range(3), key=lambda r: first(r, eos))
    n = first(r, eos)
    assert out[r, T + n] == eos and (out[r, T + n + 1:] == 97).all() and out.shape[1] > T + n + 1


def test_default_eos_is_the_models(tiny):
    ids = torch.tensor([[1, 2, 3, 4]])
    out = gpt2kern.generate(tiny, ids, max_new_tokens=40)
    ref = hf_generate(tiny, ids, max_new_tokens=40)  # generation_config's eos (98) and pad
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=20), dict(top_p=0.9),
                                dict(temperature=1.3, top_k=50, top_p=0.8)])
def test_seeded_sampling_matches_hf_and_repeats(distil, kw):
    ids, mask = left_padded(50257, [5, 8], pad=0, seed=4)
    a = gpt2kern.generate(distil, ids, mask, max_new_tokens=12, do_sample=True, seed=123, eos_token_id=[], **kw)
    b = gpt2kern.generate(distil, ids, mask, max_new_tokens=12, do_sample=True, seed=123, eos_token_id=[], **kw)
    torch.manual_seed(123)
    hf_kw = dict(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    ref = hf_generate(distil, ids, mask, max_new_tokens=12, do_sample=True, eos_token_id=None, pad_token_id=0,
                      **hf_kw)
    assert torch.equal(a, b)
    assert torch.equal(a, ref)


def test_streamers_get_tokens_as_they_come(tiny):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    got = []
    out = gpt2kern.generate(tiny, ids, max_new_tokens=10, eos_token_id=[], streamer=lambda t: got.append(t.clone()))
    assert torch.equal(torch.stack(got, dim=1), out[:, 5:])

    class S:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.clone())

        def end(self):
            self.ended = True

    s = S()
    out = gpt2kern.generate(tiny, ids, max_new_tokens=10, eos_token_id=[], streamer=s)
    assert s.ended and torch.equal(s.puts[0], ids) and len(s.puts) == 11  # HF's protocol: prompt, then each step
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in s.puts], dim=1), out)


def test_zero_new_tokens_and_1d_prompt(tiny):
    assert torch.equal(gpt2kern.generate(tiny, torch.tensor([1, 2]), max_new_tokens=0), torch.tensor([[1, 2]]))


def test_fills_the_whole_context(tiny):
    n = tiny.config.n_positions
    ids = torch.randint(0, 99, (1, n - 8), generator=torch.Generator().manual_seed(2))
    assert (ids == 0).any()  # with pad id 0 given and no mask, both infer the mask from it
    out = gpt2kern.generate(tiny, ids, max_new_tokens=8, eos_token_id=[], pad_token_id=0)
    assert torch.equal(out, hf_generate(tiny, ids, max_new_tokens=8, eos_token_id=None, pad_token_id=0))


def test_non_cpu_float32_models_go_to_hf_generate(tiny):
    m = copy.deepcopy(tiny).double()
    ids = torch.tensor([[1, 2, 3]])
    out = gpt2kern.generate(m, ids, max_new_tokens=6, eos_token_id=[])
    assert "float64" in last_fallback_reason()
    assert torch.equal(out, hf_generate(m, ids, max_new_tokens=6, eos_token_id=None, pad_token_id=0))


def test_weights_changed_after_first_call_are_repacked(tiny):
    m = copy.deepcopy(tiny)
    ids = torch.tensor([[1, 2, 3]])
    gpt2kern.generate(m, ids, max_new_tokens=2)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight.mul_(2)
    out = gpt2kern.generate(m, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out, hf_generate(m, ids, max_new_tokens=12, eos_token_id=None, pad_token_id=0))


@pytest.mark.parametrize("kw, err, msg", [
    (dict(temperature=0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=600), ValueError, "n_positions"),
    (dict(seed="x"), TypeError, "seed"),
])
def test_bad_settings_raise(tiny, kw, err, msg):
    with pytest.raises(err, match=msg):
        gpt2kern.generate(tiny, torch.tensor([[1, 2]]), **kw)


@pytest.mark.parametrize("ids, mask, err, msg", [
    (torch.tensor([[1, 99]]), None, ValueError, "vocabulary"),
    (torch.tensor([[-1, 2]]), None, ValueError, "vocabulary"),
    (torch.tensor([[1.0, 2.0]]), None, TypeError, "integer"),
    (torch.zeros(0, 3, dtype=torch.long), None, ValueError, "batch"),
    (torch.zeros(1, 0, dtype=torch.long), None, ValueError, "seq_len"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]), ValueError, "shape"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [0, 0]]), ValueError, "no valid token"),
])
def test_bad_inputs_raise(tiny, ids, mask, err, msg):
    with pytest.raises(err, match=msg):
        gpt2kern.generate(tiny, ids, mask, max_new_tokens=2)


def test_not_a_gpt2_lm_model_raises(tiny):
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        gpt2kern.generate(tiny.transformer, torch.tensor([[1]]))


def test_engine_checks_its_own_inputs(tiny):
    from gpt2kern.model.dropin import state_of
    eng = state_of(tiny).weights.engine(1, 4, 2)
    ok = torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[True]])
    with pytest.raises(TypeError, match="ids"):
        eng.forward(ok[0].int(), ok[1], ok[2])
    with pytest.raises(ValueError, match="shape"):
        eng.forward(ok[0], torch.tensor([[0, 1]]), ok[2])
    with pytest.raises(IndexError, match="vocabulary"):
        eng.forward(torch.tensor([[500]]), ok[1], ok[2])
    with pytest.raises(IndexError, match="position"):
        eng.forward(ok[0], torch.tensor([[4096]]), ok[2])
    with pytest.raises(ValueError, match="max_rows"):
        eng.forward(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool))
    for _ in range(4):
        eng.forward(*ok)
    with pytest.raises(ValueError, match="cache holds 4"):
        eng.forward(*ok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA test: no GPU here")
def test_cuda_engine_matches_hf(distil):
    m = copy.deepcopy(distil).cuda()
    ids, mask = left_padded(50257, [9, 4, 6], pad=0, seed=7)
    ids, mask = ids.cuda(), mask.cuda()
    out = gpt2kern.generate(m, ids, mask, max_new_tokens=32, eos_token_id=[])
    assert last_fallback_reason() is None
    ref = hf_generate(m, ids, mask, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.cpu(), ref.cpu())
    a = gpt2kern.generate(m, ids, mask, max_new_tokens=8, do_sample=True, top_k=40, seed=5, eos_token_id=[])
    b = gpt2kern.generate(m, ids, mask, max_new_tokens=8, do_sample=True, top_k=40, seed=5, eos_token_id=[])
    assert torch.equal(a, b)


def test_optimize_after_generate_keeps_one_pack(tiny):
    m = copy.deepcopy(tiny)
    gpt2kern.generate(m, torch.tensor([[1, 2]]), max_new_tokens=2)
    assert "_gpt2kern_private_state" in m.__dict__
    gpt2kern.optimize(m)
    assert "_gpt2kern_private_state" not in m.__dict__
    ids = torch.tensor([[4, 5, 6]])
    out = gpt2kern.generate(m, ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out, hf_generate(tiny, ids, max_new_tokens=10, eos_token_id=None, pad_token_id=0))


def test_engine_at_every_isa_level(distil, isa):
    """The decode engine's kernels at each ISA level this CPU runs (AVX-512, AVX2, portable): HF's greedy tokens,
    batched with left padding (the `isa` fixture forces the level for the whole call)."""
    ids, mask = left_padded(50257, [7, 3], pad=0, seed=11)
    out = gpt2kern.generate(distil, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert last_fallback_reason() is None
    ref = hf_generate(distil, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)
