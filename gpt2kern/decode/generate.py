"""gpt2kern.generate: the fast decode loop — greedy or sampled, batched with left padding, eos per row.

The seed's loop, with the model step in C++ (csrc/cpu/engine.cpp):

    logits = engine.forward(prompt)                 prefill: every layer, K/V into a preallocated cache
    repeat max_new_tokens times:
        next = argmax(logits)  or  sample(warp(logits))      HF's warpers: temperature, top-k, top-p
        rows that already hit eos get the pad token instead
        stop when every row has hit eos
        logits = engine.forward(next)               one C++ call for all layers + lm_head on one token per row

Greedy output equals HF's `model.generate(..., do_sample=False)`; sampling reproduces HF's token choices for the
same seed (the same torch ops draw from the same generator). On CUDA the step is gpt2kern/decode/cuda_graph.py's decoder
(a CUDA graph replay). Models the engine cannot serve (guard.why_not(..., "generate"): not float32, an unsupported
config, hooks, ...) are handed to HF's own `generate` with the same settings (`hf_generate`, also the CLI's
reference); `gpt2kern.generate_fallback_reason()` says why.
"""
from __future__ import annotations

import threading
import time

import torch
from transformers import GPT2LMHeadModel

from ..model import guard
from ..model.dropin import State, hf_position_ids, state_of, tracing_open

_local = threading.local()


def last_fallback_reason() -> str | None:
    """Why this thread's last `generate` call ran HF's generate instead of the engine (None if it did not).
    Exported as gpt2kern.generate_fallback_reason."""
    return getattr(_local, "fallback", None)


class ThreadChooser:
    """How many threads each decode step's kernels use: torch's count, or 1 while 1 measures faster.

    A decode step is ~30 short parallel regions, each of which waits for every thread it started. When another
    process keeps a core busy, the thread on that core runs when the scheduler lets it, and 2 threads measured
    over twice as slow as 1 on the 2-core dev machine (bench/RESULTS.md). So the engine times its steps: a running mean
    per choice, the faster choice taken, the other one tried again after `every` steps (a busy core can go
    quiet again; each try that loses doubles the wait, up to 256 steps, so a quiet machine pays < 1 % for the
    tries). The first try is call `first_try` (speculative decoding's verify and draft calls, which may be few,
    try later). The cap is per call and per calling thread (csrc/cpu/parallel.h): torch's setting is untouched."""

    def __init__(self, every: int = 16, first_try: int = 3):
        self.n = torch.get_num_threads()
        self.first_every = self.every = every
        self.step, self.next_try = 0, first_try  # warm calls at torch's count, then one call at 1 thread
        self.mean: dict[int, float] = {}
        self.best = self.n

    def pick(self) -> int:
        if self.n <= 1:
            return 0
        self.step += 1
        if self.step == self.next_try:
            self.next_try += self.every
            return 1 if self.best == self.n else self.n
        return self.best if self.best != self.n else 0

    def record(self, threads: int, seconds: float):
        c = threads or self.n
        m = self.mean.get(c)
        self.mean[c] = seconds if m is None else 0.7 * m + 0.3 * seconds
        best = min(self.mean, key=self.mean.get)
        if c != self.best:  # a try: the other choice lost (wait longer for the next) or won (switch)
            self.every = min(2 * self.every, 256) if best == self.best else self.first_every
        self.best = best


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, torch.Tensor):
        return [int(e) for e in eos.reshape(-1).tolist()]
    return [int(e) for e in eos]


def _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, seed):
    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"generate expects a transformers GPT2LMHeadModel, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq_len] with batch >= 1 and seq_len >= 1, "
                         f"got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.long()
    if input_ids.device.type == "meta":  # (other devices are fine: the ids are moved to the model's)
        raise ValueError("input_ids are on the meta device: they hold no token ids")
    vocab = model.config.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids contains {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab})")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.device.type == "meta":
            raise ValueError("attention_mask is on the meta device: it holds no values")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask != 0
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask row(s) {empty} have no valid token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    n_pos = model.config.n_positions
    longest = int(mask.sum(dim=1).max())
    if longest + max_new_tokens > n_pos:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"of n_positions={n_pos}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return input_ids, mask


def _warp(scores, temperature, top_k, top_p):
    """HF's sampling warpers, in HF's order and with HF's exact ops (so a seed picks the same tokens)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = 0
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None, pad_token_id=None,
             seed: int | None = None, streamer=None, weights: str | None = None,
             speculative=None, draft_tokens: int | None = None) -> torch.LongTensor:
    """Generate up to `max_new_tokens` tokens after each row of `input_ids` ([B, T] or [T]; left-pad batches and
    pass `attention_mask`). Returns [B, T + n] token ids, prompt included, like HF's generate.

    - Greedy unless `do_sample`; sampling applies temperature, then top_k (0 = off), then top_p (1 = off).
    - `eos_token_id`: int or list; default the model's (`generation_config`); `[]` never stops early. A row that
      produced eos gets `pad_token_id` (default: the model's, else the first eos) until every row is done.
    - Without `attention_mask`, a prompt holding a pad id that is not an eos id is masked there, as HF does.
    - `seed`: sampling draws from a generator seeded with it (HF's generate after `torch.manual_seed(seed)`
      draws the same tokens); None uses torch's global generator.
    - `streamer`: HF-style object (`put(tensor)`, `end()`; gets the prompt first, then each step's [B] tokens)
      or a plain callable called with each step's [B] tokens.
    - `weights`: 'fp32', 'fp16', 'bf16' or 'int8' (see optimize); default the optimized model's mode, else 'fp32'.
      Another mode than the optimized model's packs a private copy for generate; the model is left as it is.
    - `speculative`: 'fp16', 'bf16' or 'int8', or a smaller GPT2LMHeadModel with the same vocabulary (None: off):
      speculative decoding on CPU — the draft (the model's own copy in that mode, or that model) proposes a few
      tokens, one forward of the model's own weights checks them all. Greedy: the tokens (and the streamer's
      per-step [B] tensors) are exactly those of the same call without it. Sampling: speculative sampling's
      acceptance rule, so each token is drawn from exactly the plain loop's distribution (though a seed draws
      other tokens than without it). `last_speculative_stats()` describes the last such call.
    - `draft_tokens`: tokens drafted per round, 1..8; None (default): chosen each round from the measured times
      and acceptance rate, plain steps while drafting does not pay (so a draft that rarely agrees costs little).
    """
    _check_speculative(speculative, model, draft_tokens)
    if weights is not None:
        from ..kernels.weights import check_mode

        check_mode(weights)
    gc = model.generation_config if isinstance(model, GPT2LMHeadModel) else None
    eos = _as_list(gc.eos_token_id if (eos_token_id is None and gc is not None) else eos_token_id)
    pad_given = pad_token_id if pad_token_id is not None else (gc.pad_token_id if gc is not None else None)
    if attention_mask is None and pad_given is not None and pad_given not in eos and \
            isinstance(input_ids, torch.Tensor) and input_ids.device.type != "meta" and \
            bool((input_ids == pad_given).any()):
        attention_mask = input_ids != pad_given  # HF's generate infers the mask from a pad id this way too
    input_ids, mask = _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, seed)
    pad_token_id = pad_given if pad_given is not None else (eos[0] if eos else 0)
    if weights not in (None, "fp32") and model.lm_head.weight.device.type not in guard._kernel_devices():
        raise ValueError(f"weights={weights!r} runs on {' or '.join(d.upper() for d in guard._kernel_devices())} "
                         f"only; this model is on {model.lm_head.weight.device} (use weights='fp32')")
    st = state_of(model, weights)
    why = guard.why_not(st, "generate", model=model)
    if why is None and tracing_open(model):
        raise ValueError("gpt2kern.tracing records the optimized forward's steps, and gpt2kern.generate's engine "
                         "runs none (one C++ call per step): call model.generate(...) or model(ids) inside tracing")
    _local.fallback = why
    if why is not None:
        return hf_generate(model, input_ids, mask if attention_mask is not None else None, max_new_tokens,
                           do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, eos=eos,
                           pad_token_id=pad_token_id, seed=seed, streamer=streamer).cpu()

    dev = model.lm_head.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed) if (do_sample and seed is not None) else None
    if speculative is not None:
        if dev.type != "cpu":
            raise ValueError(f"speculative runs on CPU only; this model is on {dev}")
        if isinstance(speculative, GPT2LMHeadModel):
            ddev, dpos = speculative.lm_head.weight.device, speculative.config.n_positions
            if ddev.type != "cpu":
                raise ValueError(f"speculative: the draft model is on {ddev}; it must be on the CPU with the model")
            if int(mask.sum(dim=1).max()) + max_new_tokens > dpos:
                raise ValueError(f"speculative: the draft model's context (n_positions={dpos}) is shorter than the "
                                 f"prompt + max_new_tokens")
        draft = _draft_state(model, speculative)
        rule = _SamplingRule(temperature, top_k, top_p, gen) if do_sample else _GreedyRule()
        return _speculative(model, st, draft, rule, input_ids, mask, max_new_tokens, eos, pad_token_id, streamer,
                            _DraftPolicy(draft_tokens))
    put = getattr(streamer, "put", None) or streamer
    if hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())  # HF hands streamers CPU tensors
    B, T = input_ids.shape
    with torch.inference_mode():
        if dev.type == "cpu":  # the C++ engine: one call per step
            eng = st.weights.engine(B, T + max_new_tokens, B * T)
            pos = hf_position_ids(mask)
            next_pos = mask.sum(dim=1, keepdim=True)
            ones = torch.ones(B, 1, dtype=torch.bool)
            chooser = ThreadChooser()

            def first():
                return eng.forward(input_ids, pos, mask)

            def advance(nxt):
                threads = chooser.pick()
                t0 = time.perf_counter()
                logits = eng.forward(nxt[:, None], next_pos, ones, threads)
                chooser.record(threads, time.perf_counter() - t0)
                next_pos.add_(1)
                return logits
        else:  # CUDA: the decode step replayed from a CUDA graph (gpt2kern/decode/cuda_graph.py)
            from .cuda_graph import CudaGraphDecoder

            dec = CudaGraphDecoder(model, B, T + max_new_tokens, weights=weights)
            input_ids, mask = input_ids.to(dev), mask.to(dev)

            def first():
                return dec.prefill(input_ids, attention_mask=mask)

            def advance(nxt):
                return dec.step(nxt)
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        out = [input_ids]
        logits = first() if max_new_tokens else None
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(_warp(logits, temperature, top_k, top_p), dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=gen).squeeze(1)
            else:
                nxt = torch.argmax(logits, dim=-1)
            if eos:
                nxt = torch.where(unfinished, nxt, pad_token_id)
            out.append(nxt[:, None])
            if put is not None:
                put(nxt.clone() if nxt.device.type == "cpu" else nxt.cpu())
            if eos:
                unfinished &= ~torch.isin(nxt, eos_t)
                if not bool(unfinished.any()):
                    break
            if step + 1 < max_new_tokens:
                logits = advance(nxt)
    if hasattr(streamer, "end"):
        streamer.end()
    return torch.cat(out, dim=1)


_SPEC_MODES = ("fp16", "bf16", "int8")


def _check_speculative(speculative, model, draft_tokens):
    if draft_tokens is not None:
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or \
                not 1 <= draft_tokens <= _DraftPolicy.MAX_K:
            raise ValueError(f"draft_tokens must be None (chosen per round) or an int in 1..{_DraftPolicy.MAX_K}, "
                             f"got {draft_tokens!r}")
        if speculative is None:
            raise ValueError("draft_tokens is the speculative draft's length: pass speculative= too")
    if speculative is None or (isinstance(speculative, str) and speculative in _SPEC_MODES):
        return
    if not isinstance(speculative, GPT2LMHeadModel):
        raise ValueError(f"speculative must be None, one of {', '.join(map(repr, _SPEC_MODES))} (the model's own "
                         f"copy in that mode drafts) or a GPT2LMHeadModel (a smaller draft model), got {speculative!r}")
    if isinstance(model, GPT2LMHeadModel) and speculative.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"speculative: the draft model's vocabulary ({speculative.config.vocab_size} tokens) is not "
                         f"the model's ({model.config.vocab_size}); a draft must share the tokenizer")


def last_speculative_stats() -> dict | None:
    """This thread's last `generate(..., speculative=...)` call: rounds (target forwards after the prefill, drafted
    or plain), drafted (draft tokens checked), accepted (of those, kept), plain (rounds run without a draft), k (the
    draft length at the end), draft_int8_dot (whether an int8 draft quantized x too: draft_int8_dot()). None before
    any such call."""
    return getattr(_local, "spec_stats", None)


class _DraftPolicy:
    """How many tokens to draft in the next round (0: a plain target step), from a cost model of measured times.
    A round of k drafts costs k·draft + verify(k), with verify(k) = step + k·extra (an exact verify is one decode
    step's arithmetic per position: at B = 1 it reads the weights once but does k + 1 steps' sums), and keeps on
    average (1 - a^(k+1)) / (1 - a) tokens, a the running rate at which drafted tokens are kept (a round stops at
    the first refusal among the running rows). The next k is the one with the most tokens per second; when no k
    beats plain steps, drafting pauses for `pause` rounds (the pause grows 4× after each retry that still loses, up
    to 256, so a draft that never pays costs a few retries per few hundred tokens; a retry drafts 1 token to
    measure the rate again; when the measured costs leave no k that would pay even if every draft were kept — a
    batch whose steps are compute-bound, a draft nearly as slow as the model — drafting stops for the call). The
    first round is a plain step, so the step time is measured before any draft. Where the host's memory speed
    drifts within a call, the first step's time goes stale while the verifies slow down with the host: so step and
    extra are refitted after each timing as the least-squares line through the recent (k, verify seconds) and
    (0, step seconds) points, older ones decaying, whenever their k vary enough to fix a slope (else the last step
    time stands and the verify's excess over it is the extra).
    `fixed`: the caller's k for every round instead."""

    MAX_K = 8  # (the verify's rows: B·(MAX_K + 1) fit the engine's buffers)
    DECAY = 0.8  # per timed forward, of the older timings' weight in the fitted line

    def __init__(self, fixed: int | None = None):
        self.kept, self.refused = 3.0, 1.0  # decayed counts of kept and refused drafts (prior rate 0.75)
        self.t_step = self.t_draft = self.t_extra = None  # EWMAs, seconds
        # the first draft is one token: its verify (two positions) is the cheapest probe of the costs, which at B = 8
        # are a compute-bound step's per position (a first round of 2 cost 2.3 plain steps there)
        self.k, self.off, self.pause, self.retry = 1, 1, 8, False
        self.measured = 0  # verify times measured
        self.fixed = fixed  # a k the caller chose: every round drafts it
        self.fit = [0.0] * 5  # decayed sums over timed forwards (k, seconds): w, k, s, k·k, k·s

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.off > 0:
            self.off -= 1
            return 0
        return self.k

    @staticmethod
    def _mean(old, new):
        return new if old is None else 0.7 * old + 0.3 * new

    def _observe(self, k: int, seconds: float):
        self.fit = [self.DECAY * a + b for a, b in zip(self.fit, (1.0, k, seconds, k * k, k * seconds))]

    def _refit(self) -> bool:
        """step and extra from the line through the timed forwards, where their k vary enough; False if not."""
        w, sk, sv, skk, skv = self.fit
        spread = w * skk - sk * sk  # w² · the weighted variance of k
        if spread < 0.25 * w * w:
            return False
        extra = (w * skv - sk * sv) / spread
        step = (sv - extra * sk) / w
        if step <= 0 or extra < 0:
            return False
        self.t_step, self.t_extra = step, extra
        return True

    def record_step(self, seconds: float | None):
        if seconds is not None:
            self.t_step = self._mean(self.t_step, seconds)
            self._observe(0, seconds)
            self._refit()

    def record_round(self, k: int, kept: int, draft_seconds: float | None, verify_seconds: float | None):
        """A drafted round; a time is None when its calls ran at a thread count ThreadChooser was only trying (a
        1-thread try can take twice as long: it says nothing of the costs)."""
        self.kept = 0.8 * self.kept + kept
        self.refused = 0.8 * self.refused + (kept < k)
        if draft_seconds is not None:
            self.t_draft = self._mean(self.t_draft, draft_seconds / k)
        if self.t_step is not None and verify_seconds is not None:
            self._observe(k, verify_seconds)
            if not self._refit():
                self.t_extra = self._mean(self.t_extra, max(verify_seconds - self.t_step, 0.0) / k)
            self.measured += 1
        self._choose()

    def rate(self) -> float:
        return min(self.kept / (self.kept + self.refused), 0.999)

    def speedup(self, k: int, a: float | None = None) -> float:
        """Modelled tokens per second of rounds of k drafts, over plain steps' (at acceptance rate a: the
        running one by default)."""
        a = self.rate() if a is None else a
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens * self.t_step / (k * self.t_draft + self.t_step + k * self.t_extra)

    def _choose(self):
        if self.t_step is None or self.t_extra is None:
            return
        best = max(range(1, self.MAX_K + 1), key=self.speedup)
        if self.speedup(best) > 1.0:
            self.k, self.retry, self.pause = best, False, 8
            return
        if self.retry:  # a retry that still loses: wait longer for the next
            self.pause = min(4 * self.pause, 256)
        if self.measured >= 2 and max(self.speedup(k, 0.999) for k in range(1, self.MAX_K + 1)) <= 1.0:
            self.pause = 1 << 62  # even a draft that is always kept would not pay here (costs, not content): stop
        self.k, self.off, self.retry = 1, self.pause, True


class _GreedyRule:
    """Greedy verification: a draft token is kept where it is the target's argmax."""

    def pick(self, logits):  # [B, V] -> [B]
        return torch.argmax(logits, dim=-1)

    def draft(self, logits):  # the draft's token and what the check needs of its distribution (nothing)
        return torch.argmax(logits, dim=-1), None

    def check(self, logits, d, qs):
        """logits [B, k+1, V]: the target's after c, d1, .., dk. Returns each row's count of leading kept draft
        tokens and a function giving every row's token at a position n <= each running row's count."""
        g = torch.argmax(logits, dim=-1)
        return torch.cumprod((d == g[:, :d.shape[1]]).long(), dim=1).sum(dim=1), lambda n: g[:, n]


class _SamplingRule:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). With p the target's warped distribution and
    q the draft's, a drafted token x ~ q is kept with probability min(1, p(x)/q(x)); the first one refused is
    replaced by a draw from max(0, p - q) renormalized; when all k are kept, one more token is drawn from p after
    them. Each token so produced is distributed exactly as p given the tokens before it. Rows share the round's
    stopping point (the first refusal among the running rows); a row whose own draft was kept there emits that
    draft token, which the rule produced as well, and whether a position is reached depends only on earlier
    positions, so every row's tokens follow p. The draws differ from the plain loop's, so a seed gives other tokens
    than without `speculative`, drawn from the same distribution."""

    def __init__(self, temperature, top_k, top_p, gen):
        self.temperature, self.top_k, self.top_p, self.gen = temperature, top_k, top_p, gen

    def probs(self, logits):  # [..., V] -> the warped distribution, as the plain loop computes it
        shape = logits.shape
        p = torch.softmax(_warp(logits.reshape(-1, shape[-1]), self.temperature, self.top_k, self.top_p), dim=-1)
        return p.view(shape)

    def sample(self, p):
        return torch.multinomial(p, num_samples=1, generator=self.gen).squeeze(1)

    def pick(self, logits):
        return self.sample(self.probs(logits))

    def draft(self, logits):
        q = self.probs(logits)
        return self.sample(q), q

    def check(self, logits, d, qs):
        B, k = d.shape
        p, q = self.probs(logits), torch.stack(qs, 1)  # [B, k+1, V], [B, k, V]
        pd = p[:, :k].gather(2, d[..., None]).squeeze(2)
        qd = q.gather(2, d[..., None]).squeeze(2)
        u = torch.rand(B, k, generator=self.gen, dtype=p.dtype)
        kept = torch.cumprod((u * qd < pd).long(), dim=1).sum(dim=1)

        def token(n):
            if n == k:
                return self.sample(p[:, k])
            resid = (p[:, n] - q[:, n]).clamp_min(0)
            total = resid.sum(dim=1, keepdim=True)
            # a refused token has q(x) > p(x), so its row's residual has mass; other rows' are not used
            resid = torch.where(total > 0, resid / total.clamp_min(1e-30), p[:, n])
            return torch.where(kept > n, d[:, n], self.sample(resid))

        return kept, token


def _draft_state(model, speculative) -> State:
    """The draft's weights: a draft model's own state, or the model's own state when it is optimized in mode
    `speculative`, else a private pack kept beside generate's other private one (`state_of` keeps one mode only,
    and the target needs its own), made once and repacked only when the model changes."""
    if isinstance(speculative, GPT2LMHeadModel):
        st = state_of(speculative, None)
        why = guard.why_not(st, "generate", model=speculative)
        if why is not None:
            raise ValueError(f"speculative: the draft model cannot run in gpt2kern's engine: {why}")
        return st
    return state_of(model, speculative, slot="_gpt2kern_draft_state")


def draft_int8_dot() -> bool:
    """Whether an int8 draft multiplies x quantized to int8 too (ops.set_int8_dot's kernels, for the draft's engine
    only): where the CPU has VNNI's dot products and the process's switch is left on auto (or is on: then every int8
    matmul quantizes x anyway; off keeps the draft widening too). The draft only proposes tokens (the model's own
    forward decides each one kept), so its error costs only refused drafts, and VNNI does four times the widening
    kernel's products per instruction: on Zen 4 a gpt2-medium-config draft step took 10.4 ms instead of 12.6–13.1
    and kept as many drafts (bench/RESULTS.md)."""
    from .. import _C
    from ..kernels import ops

    mode, kernels = _C.int8_dot_mode(), ops.int8_dot_kernels()
    return kernels is not None and (mode == "on" or mode == "auto" and kernels in ("avx512vnni", "avxvnni"))


CATCH_UP = 2  # pending tokens the draft is fed before it drafts again after a pause; older ones it skips


def _speculative(model, st, draft, rule, input_ids, mask, max_new_tokens, eos, pad_token_id, streamer, policy):
    """Speculative decoding (CPU engines). Per round the target (the model's own weights) has emitted token c; the
    draft, fed everything kept so far, proposes d1..dk; one target forward over [c, d1..dk]
    (Engine.forward(all_logits=True): every position's logits, bit-identical to the plain loop's single-token
    steps) gives the target's logits after each prefix; `rule` (greedy or sampling) says how many leading draft
    tokens each row keeps and gives the token after them. The round keeps n + 1 tokens, n the fewest kept over the
    rows still running (greedy: every kept token is the plain loop's own choice). Both caches are truncated to the
    kept tokens. Each kept token goes through the plain loop's eos / pad / streamer step, one [B] tensor per step."""
    B, T = input_ids.shape
    draft_w = draft.weights
    x_int8 = draft_w.mode == "int8" and draft_int8_dot()
    stats = dict(rounds=0, drafted=0, accepted=0, plain=0, k=0, draft_int8_dot=x_int8)
    _local.spec_stats = stats
    put = getattr(streamer, "put", None) or streamer
    if hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    max_len = T + max_new_tokens
    out = [input_ids]
    with torch.inference_mode():
        eng = st.weights.engine(B, max_len, B * max(T, 9))
        drf = draft_w.engine(B, max_len, B * max(T, CATCH_UP + 1))
        if x_int8:
            drf.int8_dot = True
        pos = hf_position_ids(mask)
        start = mask.sum(dim=1)  # each row's position of the first new token
        eos_t = torch.tensor(eos, dtype=torch.long)
        unfinished = torch.ones(B, dtype=torch.bool)
        done = False
        # threads per call, as the plain loop picks them (ThreadChooser), one choice per kind of call
        # (a draft that rarely pays leaves few draft and verify calls: a 1-thread try among them would cost more
        # than among the steps, so theirs come later)
        choosers = dict(draft=ThreadChooser(first_try=8), verify=ThreadChooser(first_try=8), step=ThreadChooser())

        def call(engine, kind, ids, p, all_logits=False):  # (logits, seconds; None for a ThreadChooser try)
            n = ids.shape[1]
            ch = choosers[kind]
            threads = ch.pick()
            usual = (threads or ch.n) == ch.best
            t0 = time.perf_counter()
            res = engine.forward(ids, p, torch.ones(B, n, dtype=torch.bool), threads, all_logits)
            seconds = time.perf_counter() - t0
            ch.record(threads, seconds / n)
            return res, seconds if usual else None

        def emit(tok):  # the plain loop's step for one [B] tensor of chosen tokens; True: every row is done
            nonlocal unfinished
            if eos:
                tok = torch.where(unfinished, tok, pad_token_id)
            out.append(tok[:, None])
            if put is not None:
                put(tok.clone())
            if eos:
                unfinished &= ~torch.isin(tok, eos_t)
                return not bool(unfinished.any())
            return False

        if max_new_tokens:
            c = rule.pick(eng.forward(input_ids, pos, mask))
            if draft.transformer is st.transformer:  # the model's own copy: it starts from the model's prompt K/V
                drf.copy_cache(eng, T)
            else:  # a draft model: its own prefill (its logits are not needed)
                drf.forward(input_ids, pos, mask)
            done = emit(c)
        emitted = 1
        fed = 0  # new tokens in the target's cache (all but the last emitted)
        pending = []  # [B] tokens the target has kept and the draft has not seen yet
        dpos = 0  # the new-token index of pending[0] (of c when there are none)
        dlen = 0  # new tokens in the draft's cache: dpos, less the tokens it skipped after a pause
        while not done and emitted < max_new_tokens:
            k = min(policy.next(), max_new_tokens - emitted - 1)
            if k > 0:  # draft: the pending tokens (the last CATCH_UP after a pause), then c, then d1..d(k-1)
                toks = pending + [c]
                pending = []
                if len(toks) > CATCH_UP:
                    # the draft skips the older ones: its cache then lacks them, its drafts may be worse, the
                    # tokens are not (any draft gives them); catching up on a long pause costs as much as it saved
                    dpos += len(toks) - CATCH_UP
                    toks = toks[-CATCH_UP:]
                n = len(toks)
                dl, first = call(drf, "draft", torch.stack(toks, 1), start[:, None] + dpos + torch.arange(n))
                dpos, dlen = dpos + n, dlen + n
                drafts, qs, singles = [], [], []  # singles: the single-token draft calls' seconds
                for i in range(k):
                    if i:
                        dl, secs = call(drf, "draft", drafts[-1][:, None], start[:, None] + dpos)
                        if secs is not None:
                            singles.append(secs)
                        dpos, dlen = dpos + 1, dlen + 1
                    tok, q = rule.draft(dl)
                    drafts.append(tok)
                    qs.append(q)
                d = torch.stack(drafts, 1)  # [B, k]
                logits, t_verify = call(eng, "verify", torch.cat([c[:, None], d], 1),
                                        start[:, None] + fed + torch.arange(k + 1), all_logits=True)
                per_row, token_at = rule.check(logits, d, qs)
                n = int(per_row[unfinished].min()) if eos else int(per_row.min())
                kept = [d[:, i] for i in range(n)] + [token_at(n)]
                eng.truncate(T + fed + 1 + n)  # c, d1..dn
                fed += 1 + n
                # the draft has seen c, d1..d(k-1): keep c, d1..dn; dk (if kept) is pending
                drop = k - 1 - min(n, k - 1)
                drf.truncate(T + dlen - drop)
                dpos, dlen = dpos - drop, dlen - drop
                pending = [d[:, k - 1]] if n == k else []
                stats["drafted"] += k
                stats["accepted"] += n
                # the round's draft cost as k single-token calls (the first call may carry pending tokens too)
                policy.record_round(k, n, k * sum(singles) / len(singles) if singles else
                                    None if first is None else k * first / len(toks), t_verify)
            else:  # a plain target step
                logits, secs = call(eng, "step", c[:, None], start[:, None] + fed)
                policy.record_step(secs)
                fed += 1
                pending.append(c)
                kept = [rule.pick(logits)]
                stats["plain"] += 1
            stats["rounds"] += 1
            for tok in kept:
                emitted += 1
                if emit(tok):
                    done = True
                    break
            c = kept[-1]
        stats["k"] = policy.k
    if hasattr(streamer, "end"):
        streamer.end()
    return torch.cat(out, dim=1)


class StreamAdapter:
    """A plain callable as an HF streamer (put/end): HF puts the prompt first, then each step's tokens; the callable
    gets only the new tokens, as a [B] tensor. The one adapter gpt2kern and its CLI use."""

    def __init__(self, fn):
        self.fn, self.seen_prompt = fn, False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        if self.fn is not None:
            self.fn(value.reshape(-1))

    def end(self):
        pass


def hf_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, *, do_sample=False,
                temperature=1.0, top_k=0, top_p=1.0, eos=(), pad_token_id=0, seed=None, streamer=None):
    """The same request through HF's own `model.generate` (whatever forward the model has): greedy or HF's
    sampling with the same warpers, `seed` as torch.manual_seed before it, eos ids (`[]`: never stop), a streamer
    (HF's put/end protocol, or a callable given each step's [B] tokens). The fallback of `generate` and the
    reference the CLI compares against."""
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        streamer = StreamAdapter(streamer)
    if do_sample and seed is not None:
        torch.manual_seed(seed)
    dev = model.lm_head.weight.device
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, eos_token_id=list(eos),  # []: never
              pad_token_id=pad_token_id, streamer=streamer)
    if do_sample:
        kw.update(temperature=float(temperature), top_k=top_k, top_p=float(top_p))
    with torch.no_grad():
        return model.generate(input_ids.to(dev), attention_mask=None if attention_mask is None else
                              attention_mask.long().to(dev), **kw)
