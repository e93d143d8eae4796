"""gpt2kern.generate(..., speculative=MODE or a draft model): greedy speculative decoding must give exactly the tokens
of the plain loop (and so HF's greedy ones): B=1, left-padded batches, eos inside a drafted run, max_new_tokens
mid-draft, the end of the context, every draft mode, a separate draft model; the engine's all-positions forward is
bit-identical to single-token steps. Speculative sampling must draw from exactly the plain loop's distribution
(chi-square against the exact joint distribution of the first tokens, with a close and a poor draft)."""
import copy

import pytest
import torch
from test_generate import hf_generate, left_padded

import gpt2kern
from gpt2kern.decode.generate import last_speculative_stats
from gpt2kern.model.dropin import state_of

PROMPTS = [(1, 5), (2, 1), (3, 23)]  # (seed, length)
_plain: dict = {}


def prompt(seed, n, vocab=50257):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def plain(model, ids, n, **kw):
    key = (id(model), tuple(ids.flatten().tolist()), tuple(ids.shape), n, repr(sorted(kw.items())))
    if key not in _plain:
        _plain[key] = gpt2kern.generate(model, ids, max_new_tokens=n, **kw)
    return _plain[key]


@pytest.mark.parametrize("seed,length", PROMPTS)
def test_b1_matches_plain_and_hf(distil, seed, length):
    ids = prompt(seed, length)
    ref = plain(distil, ids, 40, eos_token_id=[])
    assert torch.equal(ref, hf_generate(distil, ids, max_new_tokens=40, eos_token_id=None, pad_token_id=0))
    for n in (1, 3, 7, 40):  # max_new_tokens mid-draft too: never more tokens than asked
        out = gpt2kern.generate(distil, ids, max_new_tokens=n, eos_token_id=[], speculative="int8", draft_tokens=4)
        assert torch.equal(out, ref[:, :length + n]), n
    st = last_speculative_stats()
    assert st["accepted"] > 0 and st["drafted"] >= st["accepted"] and st["rounds"] < 39, st
    # the default: k chosen per round from this machine's timings (any choice gives the same tokens)
    assert torch.equal(gpt2kern.generate(distil, ids, max_new_tokens=40, eos_token_id=[], speculative="int8"), ref)


def test_many_prompts_match_plain(distil):
    """Near-ties in random:distilgpt2's logits (outlier channels, flat distributions) would show any numerical
    difference between the verify forward and the plain loop's steps as a different token."""
    accepted = 0
    for seed in range(10, 18):
        ids = prompt(seed, 1 + seed % 9)
        out = gpt2kern.generate(distil, ids, max_new_tokens=20, eos_token_id=[], speculative="int8",
                                draft_tokens=1 + seed % 8)
        assert torch.equal(out, plain(distil, ids, 20, eos_token_id=[])), seed
        accepted += last_speculative_stats()["accepted"]
    assert accepted > 0


def test_left_padded_batch_matches_plain_and_hf(distil):
    ids, mask = left_padded(50257, [7, 3, 5], pad=0, seed=4)
    out = gpt2kern.generate(distil, ids, mask, max_new_tokens=30, eos_token_id=[], speculative="int8", draft_tokens=3)
    ref = plain(distil, ids, 30, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, ref)
    assert torch.equal(out, hf_generate(distil, ids, mask, max_new_tokens=30, eos_token_id=None, pad_token_id=0))


def test_optimized_fp32_model(distil):
    m = gpt2kern.optimize(copy.deepcopy(distil))  # the target's weights as packed panels
    ids, mask = left_padded(50257, [4, 9], pad=0, seed=5)
    out = gpt2kern.generate(m, ids, mask, max_new_tokens=20, eos_token_id=[], speculative="int8", draft_tokens=4)
    assert torch.equal(out, plain(distil, ids, 20, attention_mask=mask, eos_token_id=[]))


def _eos_mid_way(ref, start, lo=6):
    """A token the fp32 run emits at new-token index >= lo that it did not emit before."""
    new = ref[0, start:].tolist()
    for i in range(lo, len(new)):
        if new[i] not in new[:i]:
            return new[i], i
    pytest.skip("no fresh token mid-way")


def test_eos_inside_a_draft_b1(distil):
    ids = prompt(1, 5)
    eos, i = _eos_mid_way(plain(distil, ids, 40, eos_token_id=[]), 5)
    got, want = [], []
    out = gpt2kern.generate(distil, ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=0, speculative="int8",
                            draft_tokens=5, streamer=got.append)
    ref = gpt2kern.generate(distil, ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=0, streamer=want.append)
    assert out.shape[1] == 5 + i + 1 and int(out[0, -1]) == eos
    assert torch.equal(out, ref)
    assert torch.equal(out, hf_generate(distil, ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=0))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))  # the same per-step groups


def test_eos_in_a_batch_pads_like_the_plain_loop(distil):
    ids, mask = left_padded(50257, [6, 2, 4], pad=0, seed=7)
    ref = plain(distil, ids, 36, attention_mask=mask, eos_token_id=[])
    eos, _ = _eos_mid_way(ref[1:2], ids.shape[1])  # row 1 stops mid-way, the others go on (or stop later)
    kw = dict(max_new_tokens=36, eos_token_id=eos, pad_token_id=3)
    got, want = [], []
    out = gpt2kern.generate(distil, ids, mask, speculative="int8", draft_tokens=6, streamer=got.append, **kw)
    assert torch.equal(out, gpt2kern.generate(distil, ids, mask, streamer=want.append, **kw))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(out, hf_generate(distil, ids, mask, **kw))
    assert (out[1, ids.shape[1]:] == 3).any()  # row 1 was padded after its eos


def test_prompt_at_the_end_of_the_context(tiny):
    n_pos = tiny.config.n_positions
    for length, n in ((n_pos - 2, 2), (n_pos - 13, 13), (n_pos - 40, 40)):
        ids = torch.randint(0, 99, (2, length), generator=torch.Generator().manual_seed(length))
        out = gpt2kern.generate(tiny, ids, max_new_tokens=n, eos_token_id=[], speculative="int8", draft_tokens=8)
        assert out.shape == (2, n_pos)
        assert torch.equal(out, gpt2kern.generate(tiny, ids, max_new_tokens=n, eos_token_id=[]))


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8"])
def test_every_draft_mode(distil, mode):
    ids, mask = left_padded(50257, [5, 8], pad=0, seed=9)
    out = gpt2kern.generate(distil, ids, mask, max_new_tokens=24, eos_token_id=[], speculative=mode, draft_tokens=4)
    assert torch.equal(out, plain(distil, ids, 24, attention_mask=mask, eos_token_id=[]))
    assert last_speculative_stats()["accepted"] > 0


def test_a_draft_that_never_agrees_mostly_pauses(distil):
    """Another random model never agrees with random:distilgpt2: after the first refused rounds the default policy
    runs plain steps, retrying rarely; the tokens stay exact."""
    from gpt2kern.model.loading import random_model

    ids = prompt(4, 6)
    out = gpt2kern.generate(distil, ids, max_new_tokens=60, eos_token_id=[], speculative=random_model("distilgpt2",
                                                                                                        seed=5))
    assert torch.equal(out, plain(distil, ids, 60, eos_token_id=[]))
    st = last_speculative_stats()
    assert st["plain"] >= 50 and st["drafted"] <= 6, st


def _policy_run(policy, rate, t_step=10.0, t_draft=4.0, t_extra=2.0, rounds=200, seed=0, costs=None):
    """Drive a _DraftPolicy with modelled rounds (each draft kept with probability `rate`; `costs(i)`, if given,
    the (t_step, t_extra) of round i); returns the k of every round."""
    import random

    rnd = random.Random(seed)
    ks = []
    for i in range(rounds):
        if costs is not None:
            t_step, t_extra = costs(i)
        k = policy.next()
        ks.append(k)
        if k == 0:
            policy.record_step(t_step)
        else:
            kept = 0
            while kept < k and rnd.random() < rate:
                kept += 1
            policy.record_round(k, kept, k * t_draft, t_step + k * t_extra)
    return ks


def test_draft_policy_choices():
    from gpt2kern.decode.generate import _DraftPolicy

    # a cheap draft that agrees: drafts every round after the first step, long drafts
    ks = _policy_run(_DraftPolicy(), rate=0.95, t_draft=1.0, t_extra=0.5)
    assert ks[0] == 0 and ks[1:].count(0) == 0 and sum(ks[20:]) / len(ks[20:]) >= 6
    # a draft that never agrees: a handful of one-token retries in 200 rounds, pauses growing
    ks = _policy_run(_DraftPolicy(), rate=0.0)
    drafted = [i for i, k in enumerate(ks) if k]
    assert len(drafted) <= 5 and all(ks[i] <= 2 for i in drafted), drafted
    assert all(b - a > 2 * (a1 - a0) for (a0, a1), (a, b) in zip(zip(drafted, drafted[1:]), zip(drafted[1:],
                                                                                                   drafted[2:])))
    # agreement good enough but a draft nearly as slow as the model: no draft pays
    ks = _policy_run(_DraftPolicy(), rate=0.8, t_draft=9.0)
    assert ks[1:].count(0) > 190
    # costs that no acceptance could repay (a compute-bound batch: each verified position costs a whole step): two
    # drafted rounds (two measurements of the verify), then none for the rest of the call
    ks = _policy_run(_DraftPolicy(), rate=1.0, t_draft=3.0, t_extra=10.0)
    assert sum(1 for k in ks if k) == 2, ks[:40]
    # a verify timed at a thread count ThreadChooser was only trying says nothing of the costs
    p = _DraftPolicy()
    p.record_step(0.010)
    p.record_round(2, 2, 0.008, None)
    assert p.t_extra is None and p.measured == 0
    # the modelled speed-up matches the formula; a fixed k is always drafted
    p = _DraftPolicy()
    p.kept, p.refused, p.t_step, p.t_draft, p.t_extra = 3.0, 1.0, 10.0, 4.0, 2.0
    assert abs(p.speedup(2) - (1 + 0.75 + 0.75 ** 2) * 10 / (8 + 10 + 4)) < 1e-12
    assert set(_policy_run(_DraftPolicy(fixed=3), rate=0.0, rounds=20)) == {3}


def test_draft_policy_follows_a_host_that_slows_down():
    """Mid-call the host's memory slows 1.6× (the step and each verified position with it; the compute-bound draft
    not): the policy's step time, measured once at the start, would go stale and the slowdown be charged to the
    verify's extra positions, pausing drafts that still pay. Fitted from the verifies, it keeps drafting."""
    from gpt2kern.decode.generate import _DraftPolicy

    def run(policy):
        return _policy_run(policy, rate=0.8, rounds=160, seed=1,
                           costs=lambda i: (10.0, 2.0) if i < 40 else (16.0, 3.2))

    p = _DraftPolicy()
    ks = run(p)
    assert ks[0] == 0 and ks[60:].count(0) == 0, ks
    assert abs(p.t_step - 16.0) < 0.5 and abs(p.t_extra - 3.2) < 0.3
    stale = _DraftPolicy()
    stale._refit = lambda: False  # the step time from plain steps only: the slowdown pauses the drafts
    assert run(stale)[60:].count(0) >= 5


@pytest.mark.parametrize("bad", [0, 9, 2.5, True])
def test_draft_tokens_is_checked(tiny, bad):
    with pytest.raises(ValueError, match="draft_tokens"):
        gpt2kern.generate(tiny, torch.tensor([[1, 2]]), max_new_tokens=3, speculative="int8", draft_tokens=bad)
    with pytest.raises(ValueError, match="draft_tokens"):
        gpt2kern.generate(tiny, torch.tensor([[1, 2]]), max_new_tokens=3, draft_tokens=4)


@pytest.mark.parametrize("B,steps", [(1, 6), (2, 9), (3, 5)])
def test_all_logits_forward_is_bit_identical_to_steps(distil, B, steps, isa):
    # every ISA: the verify's B·steps rows take the GEMV's register tiles (several, of unequal height), the steps not
    for model in (distil, gpt2kern.optimize(copy.deepcopy(distil))):
        w = state_of(model, None).weights
        one, many = w.engine(B, 32, B * 10), w.engine(B, 32, B * 10)
        ids, mask = left_padded(50257, [5, 2, 4][:B], pad=0, seed=2)
        from gpt2kern.model.dropin import hf_position_ids
        pos = hf_position_ids(mask.bool())
        one.forward(ids, pos, mask.bool())
        many.forward(ids, pos, mask.bool())
        nxt = torch.randint(0, 50257, (B, steps), generator=torch.Generator().manual_seed(B))
        p0 = mask.sum(dim=1, keepdim=True)
        ones = torch.ones(B, 1, dtype=torch.bool)
        ref = torch.stack([one.forward(nxt[:, t:t + 1], p0 + t, ones).clone() for t in range(steps)], 1)
        got = many.forward(nxt, p0 + torch.arange(steps), torch.ones(B, steps, dtype=torch.bool), 0, True)
        assert got.shape == ref.shape and torch.equal(got, ref)
        # truncate: roll back 3 tokens and feed different ones; the same as a fresh run of those
        many.truncate(many.length - 3)
        alt = nxt[:, -3:].flip(1)
        got2 = many.forward(alt, p0 + steps - 3 + torch.arange(3), torch.ones(B, 3, dtype=torch.bool), 0, True)
        one.truncate(one.length - 3)
        ref2 = torch.stack([one.forward(alt[:, t:t + 1], p0 + steps - 3 + t, ones).clone() for t in range(3)], 1)
        assert torch.equal(got2, ref2)


def test_copy_cache_continues_like_the_source(distil):
    """Engine.copy_cache (the draft starts from the model's prompt K/V): after copying a prefix, the next forwards of
    the copy equal the source's; shapes and lengths that do not fit are refused."""
    from gpt2kern.model.dropin import hf_position_ids

    w = state_of(distil, None).weights
    src, dst = w.engine(2, 24, 20), w.engine(2, 24, 20)
    ids, mask = left_padded(50257, [6, 3], pad=0, seed=8)
    src.forward(ids, hf_position_ids(mask.bool()), mask.bool())
    dst.forward(torch.randint(0, 50257, (2, 9)), torch.arange(9).expand(2, -1), torch.ones(2, 9, dtype=torch.bool))
    dst.copy_cache(src, src.length)  # over a cache that held something else: every trace of it goes
    assert dst.length == src.length and torch.equal(dst.key_mask, src.key_mask)
    nxt = torch.tensor([[11, 12], [13, 14]])
    p0 = mask.sum(dim=1, keepdim=True) + torch.arange(2)
    ones = torch.ones(2, 2, dtype=torch.bool)
    assert torch.equal(dst.forward(nxt, p0, ones).clone(), src.forward(nxt, p0, ones).clone())
    with pytest.raises(ValueError, match="copy_cache"):
        dst.copy_cache(src, src.length + 1)
    with pytest.raises(ValueError, match="another shape"):
        w.engine(1, 24, 20).copy_cache(src, 2)
    with pytest.raises(ValueError, match="another shape"):
        dst.copy_cache(state_of(gpt2kern.load("random:tiny")[0], None).weights.engine(2, 24, 20), 0)


def test_engine_int8_dot_is_the_engines_own(distil):
    """Engine.int8_dot gives one engine the int8 dot-product switch (speculative decoding's int8 draft): its calls
    compute what the process-wide switch in that position computes, and the process's setting stays as it was."""
    from gpt2kern.kernels import ops

    if ops.int8_dot_kernels() is None:
        pytest.skip("no int8 dot-product kernels on this CPU / ISA table")
    w = state_of(distil, "int8", slot="_gpt2kern_draft_state").weights
    ids, pos, ones = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)

    def logits(on, process):
        eng = w.engine(1, 8, 4)
        eng.int8_dot = on
        assert eng.int8_dot is on
        with ops.using_int8_dot(process):
            before = gpt2kern._C.int8_dot_mode()
            eng.forward(ids, pos, ones)
            out = eng.forward(torch.tensor([[9]]), torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool)).clone()
            assert gpt2kern._C.int8_dot_mode() == before
        return out

    x_int8, widened = logits(None, True), logits(None, False)
    assert not torch.equal(x_int8, widened)  # the switch changes decode's numbers: the comparisons below can fail
    for process in (True, False, None):
        assert torch.equal(logits(True, process), x_int8)
        assert torch.equal(logits(False, process), widened)


def test_the_int8_draft_quantizes_x_where_vnni(distil):
    """An int8 draft takes the int8 dot products where the CPU has VNNI and the process's switch is on auto (never
    where the user turned the switch off); the tokens are the plain loop's either way."""
    from gpt2kern.kernels import ops

    ids = prompt(4, 6)
    ref = plain(distil, ids, 12, eos_token_id=[])
    vnni = ops.int8_dot_kernels() in ("avx512vnni", "avxvnni")
    for switch, expect in ((None, vnni), (False, False), (True, ops.int8_dot_kernels() is not None)):
        with ops.using_int8_dot(switch):
            out = gpt2kern.generate(distil, ids, max_new_tokens=12, eos_token_id=[], speculative="int8",
                                    draft_tokens=3)
        assert torch.equal(out, ref)
        assert last_speculative_stats()["draft_int8_dot"] is expect
        gpt2kern.generate(distil, ids, max_new_tokens=4, eos_token_id=[], speculative="fp16", draft_tokens=2)
        assert last_speculative_stats()["draft_int8_dot"] is False  # only an int8 draft has x to quantize


def test_truncate_checks_its_length(tiny):
    eng = state_of(tiny, None).weights.engine(1, 8, 4)
    eng.forward(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="truncate"):
        eng.truncate(3)
    eng.truncate(0)
    assert eng.length == 0


@pytest.mark.parametrize("bad", ["fp32", "q4", 8])
def test_unknown_mode(tiny, bad):
    with pytest.raises(ValueError, match="speculative"):
        gpt2kern.generate(tiny, torch.tensor([[1, 2]]), max_new_tokens=3, speculative=bad)


def test_a_draft_model_gives_the_plain_tokens(distil, tiny):
    """Any GPT2LMHeadModel with the same vocabulary can draft (greedy stays exact however poor it is)."""
    from gpt2kern.model.loading import random_model

    draft = random_model("distilgpt2", seed=1)  # another model: it rarely agrees
    ids, mask = left_padded(50257, [5, 3], pad=0, seed=11)
    out = gpt2kern.generate(distil, ids, mask, max_new_tokens=12, eos_token_id=[], speculative=draft)
    assert torch.equal(out, plain(distil, ids, 12, attention_mask=mask, eos_token_id=[]))
    with pytest.raises(ValueError, match="vocabulary"):
        gpt2kern.generate(distil, ids, mask, max_new_tokens=3, speculative=tiny)
    short = random_model("tiny", seed=1)
    short.config.n_positions = 8
    with pytest.raises(ValueError, match="n_positions"):
        gpt2kern.generate(tiny, torch.tensor([[1, 2, 3]]), max_new_tokens=6, speculative=short)


# ---- speculative sampling: the output distribution is the plain loop's

# (warper settings, tokens counted): few enough joint outcomes that most cells expect >= 5 of 8000 draws
SAMPLING = [(dict(temperature=1.5, top_k=4), 3), (dict(temperature=0.5, top_p=0.5), 2)]


def _target_probs(model, prompt_ids, n, warp):
    """The exact joint distribution of the first n sampled tokens after prompt_ids under the model's own (fp32, HF
    forward) warped next-token distributions: {token tuple: probability}."""
    from gpt2kern.decode.generate import _warp

    probs = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in probs.items():
            ids = torch.cat([prompt_ids, torch.tensor([seq], dtype=torch.long).reshape(1, -1)], 1)
            with torch.no_grad():
                logits = model(ids).logits[:, -1].double()
            p = torch.softmax(_warp(logits, warp.get("temperature", 1.0), warp.get("top_k", 0),
                                    warp.get("top_p", 1.0)), dim=-1)[0]
            for t in p.nonzero().flatten().tolist():
                nxt[seq + (t,)] = pr * float(p[t])
        probs = nxt
    return probs


def _chi2_pvalue(counts, probs):
    """Pearson's chi-square test of counts {outcome: n} against probs; cells expected below 5 are pooled."""
    total = sum(counts.values())
    if not set(counts) <= set(probs):  # an outcome the target never draws
        return 0.0, 0
    stat, df, pool_e, pool_o = 0.0, -1, 0.0, 0
    for key, p in probs.items():
        e, o = total * p, counts.get(key, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    if pool_e > 0:
        stat, df = stat + (pool_o - pool_e) ** 2 / pool_e, df + 1
    assert df >= 5
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64))), df


def _sampled_counts(model, prompt_ids, n, warp, calls=1000, rows=4, **kw):
    """Counts of the first n tokens of calls × rows draws (3 tokens more are generated, so that the counted ones
    come from drafted rounds, not from a short last one)."""
    counts: dict = {}
    stats = dict(drafted=0, accepted=0)
    for seed in range(calls):
        out = gpt2kern.generate(model, prompt_ids.expand(rows, -1), max_new_tokens=n + 3, do_sample=True, seed=seed,
                                eos_token_id=[], **warp, **kw)
        for row in out[:, prompt_ids.shape[1]:prompt_ids.shape[1] + n].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        if "speculative" in kw:
            st = last_speculative_stats()
            stats = {key: stats[key] + st[key] for key in stats}
    return counts, stats


def _perturbed(model, scale, seed=0):
    """A copy of model with Gaussian noise (scale × each matrix's std) on its matrices: a draft that agrees often,
    not always."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("warp,n", SAMPLING, ids=["temperature+top_k", "temperature+top_p"])
def test_speculative_sampling_draws_the_targets_distribution(tiny, warp, n):
    """Chi-square of the first n sampled tokens (all but the first come from the acceptance rule) against their
    exact joint distribution under the target, for the model's int8 copy (close to the target: drafts almost always
    kept, often several per round) and for a noisy copy (many drafts refused: the residual draws carry much of the
    distribution)."""
    from gpt2kern.model.loading import random_model

    ids = torch.tensor([[5, 17, 42]])
    probs = _target_probs(tiny, ids, n, warp)
    for draft in ("int8", _perturbed(tiny, 0.1)):
        counts, st = _sampled_counts(tiny, ids, n, warp, speculative=draft, draft_tokens=4 if draft == "int8" else 2)
        assert st["accepted"] > st["drafted"] / 2 if draft == "int8" else st["accepted"] < st["drafted"] / 2, st
        pvalue, df = _chi2_pvalue(counts, probs)
        assert pvalue > 1e-4, (draft if isinstance(draft, str) else "noisy copy", pvalue, df, st)
    # the test can fail: another model's own samples are far from the target's distribution
    other = random_model("tiny", seed=1)
    assert _chi2_pvalue(_sampled_counts(other, ids, n, warp, calls=100)[0], probs)[0] < 1e-6


def test_speculative_sampling_batches_eos_and_seeds(distil):
    """Left-padded rows, eos inside drafted runs, a seed: the same call gives the same tokens; a row that hit eos is
    padded as in the plain loop; stats show drafts were kept."""
    ids, mask = left_padded(50257, [6, 2, 4], pad=0, seed=7)
    kw = dict(max_new_tokens=30, do_sample=True, top_k=3, seed=5, speculative="int8", draft_tokens=4, pad_token_id=3)
    ref = gpt2kern.generate(distil, ids, mask, eos_token_id=[], **kw)
    assert torch.equal(ref, gpt2kern.generate(distil, ids, mask, eos_token_id=[], **kw))
    assert last_speculative_stats()["accepted"] > 0
    eos = int(ref[1, ids.shape[1] + 4])
    out = gpt2kern.generate(distil, ids, mask, eos_token_id=eos, **kw)
    for row in out[:, ids.shape[1]:].tolist():
        if eos in row:
            assert all(t == 3 for t in row[row.index(eos) + 1:])


# ---- HF's own assisted generation with gpt2kern.draft_model

def test_hf_assisted_generation_with_a_draft_model(distil):
    """model.generate(assistant_model=gpt2kern.draft_model(model)) on the optimized model: HF greedy's tokens (HF's
    eager model, not optimized), the twin shares every parameter (no fp32 copy) and runs on the kernels in int8."""
    m = gpt2kern.optimize(copy.deepcopy(distil))
    d = gpt2kern.draft_model(m)
    assert all(p is q for p, q in zip(m.parameters(), d.parameters()))
    assert d.lm_head.weight is d.transformer.wte.weight
    assert gpt2kern.is_optimized(d) and gpt2kern.fallback_reason(d) is None
    assert state_of(d, None).mode == "int8"
    for seed, n in ((1, 5), (3, 12)):
        ids = prompt(seed, n)
        with torch.no_grad():
            out = m.generate(ids, assistant_model=d, max_new_tokens=30, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        assert torch.equal(out, hf_generate(distil, ids, max_new_tokens=30, eos_token_id=None, pad_token_id=0))
    # the twin follows the model's weights: an in-place change repacks its int8 copy
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
        ref = copy.deepcopy(d)
        gpt2kern.restore(ref)
        x = prompt(2, 4)
        assert (d(x).logits - ref(x).logits).abs().max() < 0.05 * ref(x).logits.abs().max()


def test_draft_model_checks_its_arguments(tiny):
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        gpt2kern.draft_model(tiny.transformer)
    with pytest.raises(ValueError, match="fp32"):
        gpt2kern.draft_model(tiny, weights="fp32")
    with pytest.raises(ValueError, match="q4"):
        gpt2kern.draft_model(tiny, weights="q4")
