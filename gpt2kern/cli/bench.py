"""gpt2kern bench — every kernel against its torch equivalent, and the model end to end against HF, in one run.

What one run measures, in order (progress on stderr: a bar on a terminal, else a line per section with its time; a
table per section on stdout; --json / --plot files):
  roofline inputs   read bandwidth (torch sum over 256 MB) and fp32 FMA peak (gpt2kern's own FMA probe)
  kernels           decode shapes (M = 1, 8: rows of a batch) and prefill shapes (M = 128, 512, 1024 tokens) of
                    the model's config: ours vs torch, ratio (> 1: we are faster), GFLOP/s, % of roofline
  end to end        prefill B=1 (all-position logits, like HF) and greedy decode (16-token prompt) with
                    gpt2kern.generate, with HF's generate on the optimized model, and at batch 8, vs HF as
                    from_pretrained gives it (sdpa attention) and vs HF eager where that differs
  drop-in           what the drop-in costs and offers: the guard's per-call check, a plain `model(ids)` with grad
                    enabled (HF's path: the kernels have no backward) vs the same call under no_grad, and
                    torch.compile of the optimized model (prefill, and HF's generate with a static cache and a
                    compiled forward, decode) next to the uncompiled one (CPU only; not with --quick)
  speculative       (--speculative, CPU) gpt2kern.generate(..., speculative="int8") against plain fp32 decode in
                    the same rounds: the default policy and a fixed k = 4 at B = 1, the default at B = 8
                    (left-padded), and a draft that never agrees (the policy's worst case); ms/token, speed-up,
                    drafts kept, tokens per target pass; the tokens must equal the plain run's
  parity            max |Δlogits| vs HF eager, greedy tokens identical
  machine load      other processes' CPU use just before and during the run, and the spread of repeated timings:
                    a warning when either says the figures cannot be trusted (MachineLoad)
Every timing is interleaved with its baseline (ours, theirs, ours, ...), after a warm-up, median of --reps.
% of roofline = the time the roofline allows (max(bytes ÷ bandwidth, FLOPs ÷ peak)) ÷ the measured time;
rows whose data fit in cache can pass 100 % of the DRAM roofline.
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

import gpt2kern
from gpt2kern import _C
from gpt2kern.kernels import ops

DECODE_M, PREFILL_M = (1, 8), (128, 512, 1024)
QUICK_DECODE_M, QUICK_PREFILL_M = (1,), (128,)


def sizes(n_positions: int, quick: bool = False):
    """(kernel rows' M, prefill lengths T): the standard ones that fit the model's context (a short-context model
    gets its n_positions as the longest prefill instead)."""
    pre = QUICK_PREFILL_M if quick else PREFILL_M
    fit = tuple(T for T in pre if T <= n_positions)
    if len(fit) < len(pre) and n_positions not in fit:
        fit += (n_positions,)
    return (QUICK_DECODE_M if quick else DECODE_M) + fit, fit


@dataclass
class Bench:
    device: str = "cpu"
    reps: int = 7
    rows: list = field(default_factory=list)
    spreads: list = field(default_factory=list)  # per timed fn: (max - min) / median of its samples

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def time(self, fns: dict, reps: int | None = None, warmup: int = 1) -> dict:
        """Median seconds per call of each fn, samples interleaved round-robin after `warmup` calls each. A sample
        of a fast fn is a loop of n calls lasting >= ~2 ms (n fixed per fn from the warm-up), so microsecond
        kernels are not measured at the timer's resolution."""
        inner = {}
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(warmup):
                f()
            self.sync()
            once = (time.perf_counter() - t0) / max(warmup, 1)
            inner[k] = max(1, min(1000, int(2e-3 / max(once, 1e-7))))
        times = {k: [] for k in fns}
        for _ in range(reps or self.reps):
            for k, f in fns.items():
                n = inner[k]
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                self.sync()
                times[k].append((time.perf_counter() - t0) / n)
        for v in times.values():
            self.spreads.append((max(v) - min(v)) / statistics.median(v))
        return {k: statistics.median(v) for k, v in times.items()}


class MachineLoad:
    """What else the machine does while we measure: the CPU time other processes take, from /proc/stat's busy
    time less this process's own (and its children's: --contend's busy process is part of the run), in CPUs.
    A shared machine makes every ratio move with it, so the bench says so instead of printing nonsense."""

    BUSY_CPUS = 0.25  # other processes' average CPU use above which the figures are not to be trusted
    SPREAD = 0.15  # the same for the median spread of repeated timings, (max - min) / median

    def __init__(self):
        self.t0, self.busy0, self.own0 = self._now()

    @staticmethod
    def _now():
        import os

        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
        except (OSError, ValueError, IndexError):
            busy = None  # not Linux: unknown
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def others(self) -> float | None:
        """Other processes' average CPU use since construction (CPUs; None where /proc/stat is missing)."""
        t, busy, own = self._now()
        if busy is None or self.busy0 is None or t - self.t0 < 0.1:
            return None
        return max(0.0, ((busy - self.busy0) - (own - self.own0)) / (t - self.t0))

    @classmethod
    def sample(cls, seconds: float = 0.5) -> float | None:
        """Other processes' CPU use over the next `seconds`, this process idle."""
        m = cls()
        time.sleep(seconds)
        return m.others()

    @classmethod
    def verdict(cls, before: float | None, during: float | None, spread: float | None) -> dict:
        """The load figures and, where they say the timings cannot be trusted, a warning in one sentence."""
        busy = max((x for x in (before, during) if x is not None), default=0.0)
        noisy = spread is not None and spread > cls.SPREAD
        out = dict(other_cpus_before=before, other_cpus_during=during, median_spread=spread,
                   trusted=busy <= cls.BUSY_CPUS and not noisy)
        if not out["trusted"]:
            why = []
            if busy > cls.BUSY_CPUS:
                from .ui import cpu_count  # (the command's own count: the affinity mask)

                when = "during" if during is not None and during >= busy else "just before"
                why.append(f"other processes used {busy:.1f} of {cpu_count()} CPUs {when} the run")
            if noisy:
                why.append(f"repeated timings spread {100 * spread:.0f} % (median)")
            out["warning"] = ("this machine was busy: " + "; ".join(why) + ". Ratios and roofline fractions may be "
                              "off by that much: rerun on a quiet machine.")
        return out


def read_bandwidth(b: Bench, tries: int = 3) -> float:
    """Best of `tries` medians: a roofline is what the machine can do, and a shared machine's bandwidth moves."""
    x = torch.ones(64 * 1024 * 1024, device=b.device)  # 256 MB, far beyond any cache
    return max(x.numel() * 4 / b.time({"sum": lambda: x.sum()})["sum"] for _ in range(tries))


def fma_peak(b: Bench) -> float:
    if b.device == "cuda":  # no probe of our own on the GPU: a large fp32 matmul stands in for the peak
        a = torch.randn(4096, 4096, device="cuda")
        return 2 * 4096 ** 3 / b.time({"mm": lambda: a @ a})["mm"]
    return max(_C.fma_peak_gflops(0.2) for _ in range(3)) * 1e9


def kernel_cases(cfg, M: int, dev: str):
    """(name, ours, torch, flops, bytes) for every kernel at M rows of the model's shapes. The matmuls read the
    weights as optimize() does in fp32 (HF's own tensors, in place); their bytes come from the weight format."""
    from ..kernels.weights import WeightFormat

    E, V, H = cfg.n_embd, cfg.vocab_size, cfg.n_head
    D = E // H
    g = torch.Generator().manual_seed(M)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dev)

    gelu_hf = NewGELUActivation()
    W = {"c_attn": rnd(E, 3 * E, s=0.1), "attn.c_proj": rnd(E, E, s=0.1), "c_fc": rnd(E, 4 * E, s=0.1),
         "mlp.c_proj": rnd(4 * E, E, s=0.1)}
    bias = {k: rnd(w.shape[1]) for k, w in W.items()}
    wte, wpe = rnd(V, E, s=0.1), rnd(cfg.n_positions, E, s=0.01)
    wte_t = wte.t().contiguous() if dev != "cpu" else None  # CUDA reads [in, out]; the CPU reads wte in place
    lw, lb = rnd(E), rnd(E)
    x, r, h4 = rnd(M, E), rnd(M, E), rnd(M, 4 * E)
    f32 = 4

    def mm(name, epi="none", a=None, res=None):
        w = W[name]
        K, N = w.shape
        a = x if a is None else a
        ours = lambda: ops.conv1d(a, w, bias[name], epi, res, N)  # noqa: E731  (HF's [in, out], read in place)
        if epi == "gelu_new":
            theirs = lambda: gelu_hf(torch.addmm(bias[name], a, w))  # noqa: E731
        elif epi == "residual":
            theirs = lambda: torch.addmm(bias[name], a, w) + res  # noqa: E731
        else:
            theirs = lambda: torch.addmm(bias[name], a, w)  # noqa: E731
        return ours, theirs, 2 * M * K * N, WeightFormat("kn", "fp32", K, N).nbytes + M * (K + N) * f32

    cases = [
        ("layer_norm", lambda: ops.layer_norm(x, lw, lb, 1e-5), lambda: F.layer_norm(x, (E,), lw, lb, 1e-5), 0,
         2 * M * E * f32),
        ("add_layer_norm", lambda: ops.add_layer_norm(x, r, lw, lb, 1e-5),
         lambda: (lambda s: (s, F.layer_norm(s, (E,), lw, lb, 1e-5)))(x + r), 0, 4 * M * E * f32),
        ("conv1d c_attn", *mm("c_attn")),
        ("conv1d attn.c_proj", *mm("attn.c_proj")),
        ("conv1d c_fc+gelu_new", *mm("c_fc", "gelu_new")),
        ("conv1d mlp.c_proj+residual", *mm("mlp.c_proj", "residual", h4, r)),
        ("gelu_new", lambda: ops.gelu_new(h4), lambda: gelu_hf(h4), 0, 2 * M * 4 * E * f32),
        ("lm_head", (lambda: ops.conv1d(x, wte, None, layout="nk")) if dev == "cpu" else
         (lambda: ops.conv1d(x, wte_t, None)), lambda: F.linear(x, wte), 2 * M * E * V,
         WeightFormat("nk", "fp32", E, V).nbytes + M * (E + V) * f32),
    ]
    # attention: decode = one new token in each of M sequences over a 512-token cache (batch M); prefill = causal
    # self-attention over M tokens of one sequence
    scale = D ** -0.5
    if M <= 8:
        T = 512
        q, k, v = rnd(M, H, 1, D), rnd(M, H, T, D), rnd(M, H, T, D)
        ours = lambda: ops.attention(q, k, v, None, None, scale, T - 1, True)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        vis = M * T
    else:
        q, k, v = rnd(1, H, M, D), rnd(1, H, M, D), rnd(1, H, M, D)
        ours = lambda: ops.attention(q, k, v, None, None, scale, 0, True)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: E731
        vis = M * (M + 1) // 2  # visible (query, key) pairs
    cases.append(("attention", ours, theirs, 4 * H * D * vis, (q.numel() * 2 + k.numel() * 2) * f32))
    ids = torch.randint(0, V, (1, M), generator=g).to(dev)
    pos = torch.arange(M, device=dev)[None]
    cases.append(("embedding", lambda: ops.embedding(ids, wte, wpe, pos), lambda: wte[ids] + wpe[pos], 0,
                  3 * M * E * f32))
    return cases


def roofline_pct(t, flops, nbytes, bw, peak):
    return 100 * max(flops / peak, nbytes / bw) / t


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere), after a garbage collection."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def run(model_name="random:distilgpt2", device="cpu", reps=7, new_tokens=128, quick=False, advance=None,
        model=None, contend=False, weights=("fp32",), spec=False):
    """All measurements as a dict (what --json writes). advance(n) is called as work completes."""
    advance = advance or (lambda n=1, done=None: None)
    load_before = MachineLoad.sample() if device == "cpu" else None
    load = MachineLoad()
    b = Bench(device=device, reps=reps)
    ref = model if model is not None else gpt2kern.load(model_name)[0]
    ref = copy.deepcopy(ref).to(device).eval()
    ref.generation_config.eos_token_id = None  # fixed-length decodes: both sides generate every token
    ref.generation_config.pad_token_id = 0
    opt = copy.deepcopy(ref)
    # The speed baseline is what a user gets by default (from_pretrained's attention: sdpa where the class has
    # it); HF eager, the parity reference, is a second column where it differs.
    hf, hf_attn = ref, ref.config._attn_implementation
    if getattr(type(ref), "_supports_sdpa", False) and hf_attn != "sdpa":
        hf = copy.deepcopy(ref)
        hf.set_attn_implementation("sdpa")
    default_attn = hf.config._attn_implementation
    rss0 = rss_bytes()
    gpt2kern.optimize(opt)
    rss_added = rss_bytes() - rss0
    cfg = ref.config
    out = dict(model=model_name, device=device, threads=torch.get_num_threads(), isa=ops.isa(), reps=reps,
               torch=torch.__version__, cpu=_cpu_name(), date=time.strftime("%Y-%m-%d %H:%M"),
               gpu=torch.cuda.get_device_name() if device == "cuda" else None, rss_added_MiB=rss_added / 2**20,
               weights_MiB=sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20,
               hf_attn=default_attn, hf_second_attn=hf_attn if hf is not ref else None)
    bw = read_bandwidth(b)
    peak = fma_peak(b)
    out.update(read_bandwidth_GBps=bw / 1e9, fma_peak_GFLOPs=peak / 1e9)
    advance(done="roofline inputs")

    kernel_ms, prefill_ts = sizes(cfg.n_positions, quick)
    kernels = []
    for M in kernel_ms:
        cases = kernel_cases(cfg, M, device)
        for i, (name, ours, theirs, flops, nbytes) in enumerate(cases):
            t = b.time({"ours": ours, "torch": theirs})
            kernels.append(dict(kernel=name, M=M, ours_ms=t["ours"] * 1e3, torch_ms=t["torch"] * 1e3,
                                ratio=t["torch"] / t["ours"],
                                gflops=flops / t["ours"] / 1e9 if flops else None, flops=flops, bytes=nbytes))
            advance(done=f"kernels M={M}" if i == len(cases) - 1 else None)
    out["kernels"] = kernels

    e2e, parity = [], {}
    g = torch.Generator().manual_seed(0)
    n_params = sum(p.numel() for p in ref.parameters())
    E, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    block_params = n_params - V * E - cfg.n_positions * E
    with torch.no_grad():
        for T in prefill_ts:
            ids = torch.randint(0, V, (1, T), generator=g).to(device)
            fns = {"ours": lambda: opt(ids, use_cache=False), "hf": lambda: hf(ids, use_cache=False)}
            if hf is not ref:
                fns["hf_eager"] = lambda: ref(ids, use_cache=False)
            t = b.time(fns, reps=max(5, reps // 2))
            flops = 2 * T * (block_params + V * E) + L * 4 * E * T * T // 2
            e2e.append(dict(measure=f"prefill B=1 T={T} (all logits)", ours_ms=t["ours"] * 1e3, hf_ms=t["hf"] * 1e3,
                            ratio=t["hf"] / t["ours"], roofline_pct=100 * flops / peak / t["ours"],
                            **_eager_cols(t, t["ours"])))
            if T == prefill_ts[0]:
                parity[f"max |dlogits| prefill T={T}"] = (opt(ids).logits - ref(ids).logits).abs().max().item()
            advance(done=f"prefill T={T}")
        weight_bytes = (block_params + V * E) * 4  # read once per decode step (lm_head = wte)
        # decode is bandwidth-bound and this machine's bandwidth moves from minute to minute: its roofline is the
        # read bandwidth measured in the same interleaved rounds as the decodes (a 256 MB sum between them)
        big = torch.ones(64 * 1024 * 1024, device=device)
        decode_bw = []
        for B in (1,) if quick else (1, 8):
            prompt = torch.randint(0, V, (B, 16), generator=g).to(device)
            kw = dict(max_new_tokens=new_tokens, do_sample=False)
            res = {}
            fns = {"engine": lambda: res.__setitem__("engine", gpt2kern.generate(opt, prompt, eos_token_id=[], **kw)),
                   "hf": lambda: res.__setitem__("hf", hf.generate(prompt, **kw))}
            if hf is not ref:
                fns["hf_eager"] = lambda: res.__setitem__("hf_eager", ref.generate(prompt, **kw))
            if B == 1:
                fns["opt.generate"] = lambda: res.__setitem__("opt", opt.generate(prompt, **kw))
            fns["bandwidth"] = lambda: big.sum()
            t = b.time(fns, reps=max(5, reps // 2), warmup=1)
            bw_here = big.numel() * 4 / t["bandwidth"]
            decode_bw.append(bw_here)
            hf_ms = t["hf"] * 1e3 / new_tokens
            for key, label in (("engine", "gpt2kern.generate"), ("opt.generate", "HF generate, optimized model")):
                if key not in t:
                    continue
                ms = t[key] * 1e3 / new_tokens
                e2e.append(dict(measure=decode_measure(B, label), ours_ms=ms, hf_ms=hf_ms, ratio=hf_ms / ms,
                                tokens_per_s=B * 1e3 / ms, read_bandwidth_GBps=bw_here / 1e9,
                                roofline_pct=100 * weight_bytes / bw_here / (ms / 1e3),
                                **_eager_cols(t, t[key], per=new_tokens)))
            same = int((res["engine"][:, 16:] == res.get("hf_eager", res["hf"])[:, 16:]).sum())
            parity[f"greedy tokens identical B={B}"] = f"{same}/{B * new_tokens}"
            advance(done=f"decode B={B}")
    for k in kernels:
        k["roofline_pct"] = roofline_pct(k["ours_ms"] / 1e3, k["flops"], k["bytes"], bw, peak)
    out["end_to_end"] = e2e
    out["parity"] = parity
    out["decode_read_bandwidth_GBps"] = decode_bw[0] / 1e9  # interleaved with the B=1 decodes
    out["decode_floor_ms"] = weight_bytes / decode_bw[0] * 1e3
    out["dropin"] = dropin(b, ref, opt, prefill_ts[0], quick, advance)
    if tuple(weights) != ("fp32",) and device == "cpu":
        out["modes"] = modes(b, ref, weights, quick, new_tokens, advance)
    if spec and device == "cpu":
        out["speculative"] = speculative(b, ref, quick, new_tokens, advance)
    if contend:
        out["contend"] = contention(b, opt, new_tokens)
        advance(done="decode with a busy core")
    out["machine_load"] = MachineLoad.verdict(load_before, load.others() if device == "cpu" else None,
                                              statistics.median(b.spreads) if b.spreads else None)
    return out


def _eager_cols(t: dict, ours: float, per: int = 1) -> dict:
    """HF eager's column of an end-to-end row, where the default baseline is another attention."""
    if "hf_eager" not in t:
        return {}
    return dict(hf_eager_ms=t["hf_eager"] * 1e3 / per, ratio_eager=t["hf_eager"] / ours)


def busy_process():
    """A CPU-bound process pinned to this process's last CPU (what a browser or a build does to a user's machine)."""
    import os
    import subprocess
    import sys

    cpu = max(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code]), cpu


def contention(b: Bench, opt, new_tokens: int) -> list:
    """Decode B=1 (gpt2kern.generate) at 1 thread and at the run's threads, quiet and with one core kept busy by
    another process: rows (measure, ms/token, ratio threads/1-thread)."""
    V = opt.config.vocab_size
    prompt = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(2))
    n = min(new_tokens, 64)
    nt = torch.get_num_threads()

    def at(threads):
        def go():
            torch.set_num_threads(threads)
            try:
                gpt2kern.generate(opt, prompt, max_new_tokens=n, eos_token_id=[])
            finally:
                torch.set_num_threads(nt)
        return go
    rows = []
    for busy in (False, True):
        hog = busy_process() if busy else None
        try:
            if hog:
                time.sleep(0.2)
            t = b.time({1: at(1), nt: at(nt)}, reps=5)
        finally:
            if hog:
                hog[0].kill()
                hog[0].wait()
        where = f"CPU {hog[1]} kept busy by another process" if busy else "quiet"
        rows.append(dict(measure=f"decode B=1, {where}", threads=nt, ms=t[nt] * 1e3 / n, one_thread_ms=t[1] * 1e3 / n,
                         ratio=t[nt] / t[1]))
    return rows


def dropin(b: Bench, ref, opt, T: int, quick: bool, advance) -> list:
    """Rows (measure, ms, baseline, baseline_ms, ratio = baseline / ms) on what optimize() costs and offers; the
    guard's row has ratio None and share_pct = 100·ms / baseline_ms instead."""
    from ..model import guard

    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, T), generator=g).to(b.device)
    one = ids[:, :1]
    st = opt.transformer._gpt2kern
    rows = []

    def row(measure, t, ours, base, base_name):
        rows.append(dict(measure=measure, ms=t[ours] * 1e3, baseline=base_name, baseline_ms=t[base] * 1e3,
                         ratio=t[base] / t[ours]))

    with torch.no_grad():
        opt(one)
        t = b.time({"guard": lambda: guard.why_not(st, "forward", input_ids=one),
                    "step": lambda: opt(one, use_cache=False)})
    row("guard.why_not per forward call (warm)", t, "guard", "step", "a whole T=1 forward")
    # a cost, not a race: its share of the forward it guards (baseline ÷ ms would read as a 300× "speed-up")
    rows[-1].update(ratio=None, share_pct=100 * t["guard"] / t["step"])
    with torch.no_grad():
        t_ng = b.time({"no_grad": lambda: opt(ids, use_cache=False)}, reps=5)
    t = b.time({"plain": lambda: opt(ids, use_cache=False), "hf": lambda: ref(ids, use_cache=False)}, reps=5)
    t.update(t_ng)
    row(f"plain model(ids), grad enabled, T={T} (HF's path)", t, "plain", "no_grad", "the same under no_grad")
    row(f"plain model(ids), grad enabled, T={T} (HF's path)", t, "plain", "hf", "HF eager, grad enabled")
    advance(done="drop-in" if quick or b.device != "cpu" else None)
    if quick or b.device != "cpu":
        return rows
    torch._dynamo.reset()
    comp = torch.compile(opt)
    with torch.no_grad():
        comp(ids, use_cache=False)  # compile outside the timing
        t = b.time({"compiled": lambda: comp(ids, use_cache=False), "eager": lambda: opt(ids, use_cache=False)},
                   reps=5)
    row(f"torch.compile(optimized model), prefill T={T}", t, "compiled", "eager", "the optimized model, eager")
    # HF's recipe: a static cache and a compiled forward, vs the same generate uncompiled; per decode step
    static = copy.deepcopy(opt)
    static.forward = torch.compile(static.forward, fullgraph=True)
    prompt = torch.randint(0, V, (1, 16), generator=g).to(b.device)
    from transformers import StaticCache

    from ..model.dropin import _CACHE_ARG

    gens = {"compiled": static, "eager": opt}
    # one cache length for both runs (a fresh 64-slot static cache per call): one compiled graph serves them all
    def run(m, n):
        cache = {_CACHE_ARG: StaticCache(config=m.config, max_cache_len=64)}
        return m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **cache)
    fns = {(k, n): (lambda m=m, n=n: run(m, n)) for k, m in gens.items() for n in (8, 40)}
    for f in fns.values():
        f()  # compiles once per shape outside the timing
    t = b.time(fns, reps=5)
    per = {k: (t[(k, 40)] - t[(k, 8)]) / 32 for k in gens}
    row("HF generate, static cache, compiled forward: ms per decode step", per, "compiled", "eager",
        "the same, uncompiled forward")
    advance(done="drop-in")
    return rows


def modes(b: Bench, ref, names, quick: bool, new_tokens: int, advance) -> list:
    """The weight modes side by side (CPU): speed (decode B=1 and B=8, prefill with last-position logits, each vs
    fp32 in the same interleaved rounds), the bytes a token streams and the copy optimize() holds beside HF's
    parameters (the RSS figure is the fp32 run's, measured first: per-mode RSS deltas in one process are the
    allocator's noise), and the error against HF's
    fp32 logits (gpt2kern/cli/accuracy.py: relative L2, mean KLD, top-1 and greedy agreement)."""
    from . import accuracy

    names = list(dict.fromkeys(["fp32", *names]))  # fp32 first: every ratio is against it
    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(2)
    models = {n: gpt2kern.optimize(copy.deepcopy(ref), weights=n) for n in names}
    # int8 once more where the CPU has the int8 dot-product kernels: x quantized to int8 in decode too
    # (ops.set_int8_dot(True); the plain int8 row under the process's setting, by default prefill only where they pack)
    switch = {}
    if "int8" in names and ops.int8_dot_kernels() is not None:
        models["int8, x int8"], switch["int8, x int8"] = models["int8"], True
    names = list(models)
    T = min(128 if quick else 512, ref.config.n_positions)
    ids = torch.randint(0, V, (1, T), generator=g)
    W = {n: m.transformer._gpt2kern.weights for n, m in models.items()}
    rows = {n: dict(mode=n, weight_MiB=W[n].nbytes / 2**20, added_MiB=W[n].added_bytes / 2**20) for n in names}

    def under_switch(n, fn):  # fn with the int8 dot switch of row n (and back to what it was)
        if n not in switch:
            return fn

        def run():
            with ops.using_int8_dot(switch[n]):
                return fn()
        return run

    for B in (1,) if quick else (1, 8):
        prompt = torch.randint(0, V, (B, 16), generator=g)
        t = b.time({n: under_switch(n, lambda m=m: gpt2kern.generate(m, prompt, max_new_tokens=new_tokens,
                                                                      eos_token_id=[]))
                    for n, m in models.items()}, reps=max(5, b.reps // 2))
        for n in names:
            rows[n][f"decode_B{B}_ms"] = t[n] * 1e3 / new_tokens
            rows[n][f"decode_B{B}_vs_fp32"] = t["fp32"] / t[n]
    advance(done="weight modes: decode")
    with torch.no_grad():
        t = b.time({n: under_switch(n, lambda m=m: m(ids, use_cache=False, logits_to_keep=1))
                    for n, m in models.items()}, reps=max(5, b.reps // 2))
    for n in names:
        rows[n][f"prefill_T{T}_last_ms"] = t[n] * 1e3
        rows[n][f"prefill_T{T}_vs_fp32"] = t["fp32"] / t[n]
    advance(done="weight modes: prefill")
    for n in names:
        mode = "int8" if n in switch else n
        err = under_switch(n, lambda: accuracy.measure(ref, mode, T=T, n_greedy=0 if quick else 128,
                                                        model=models[n]))()
        rows[n].update({**err, "mode": n})
    advance(done="weight modes: error")
    return list(rows.values())


def speculative(b: Bench, ref, quick: bool, new_tokens: int, advance) -> list:
    """Speculative decoding (int8 draft; fp16 too unless quick) against plain fp32 gpt2kern.generate, each case in its
    own interleaved rounds; the tokens of every speculative run are checked against the plain run's (greedy: they
    must be equal). The worst case drafts with a copy whose embedding rows are rolled by one (so its tokens never
    match the model's) in int8: a draft as cheap as the real one that never agrees."""
    from ..decode.generate import last_speculative_stats

    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(3)
    never = copy.deepcopy(ref)
    with torch.no_grad():
        never.transformer.wte.weight.copy_(ref.transformer.wte.weight.roll(1, dims=0))
    gpt2kern.optimize(never, weights="int8")
    lengths = list(range(9, 17))
    cases = [("B=1, int8 draft, k chosen per round", 1, "int8", None),
             ("B=1, int8 draft, k = 4", 1, "int8", 4),
             ("B=1, a draft that never agrees (worst case)", 1, never, None)]
    if not quick:  # fp16 drafts cost twice int8's bytes and agree more where the distributions are flat
        cases += [("B=1, fp16 draft, k chosen per round", 1, "fp16", None),
                  ("B=8 left-padded, int8 draft, k chosen per round", 8, "int8", None)]
    rows = []
    for label, B, draft, k in cases:
        if B == 1:
            ids, mask = torch.randint(0, V, (1, 16), generator=g), None
        else:
            ids = torch.zeros(B, max(lengths), dtype=torch.long)
            mask = torch.zeros(B, max(lengths), dtype=torch.long)
            for r, n in enumerate(lengths):
                ids[r, -n:] = torch.randint(0, V, (n,), generator=g)
                mask[r, -n:] = 1
        out, stats = {}, {}
        kw = dict(max_new_tokens=new_tokens, eos_token_id=[], attention_mask=mask)

        def plain():
            out["plain"] = gpt2kern.generate(ref, ids, **kw)

        def spec():
            out["spec"] = gpt2kern.generate(ref, ids, speculative=draft, draft_tokens=k, **kw)
            stats.update(last_speculative_stats())

        t = b.time({"plain": plain, "spec": spec}, reps=max(5, b.reps // 2))
        if not torch.equal(out["spec"], out["plain"]):
            raise AssertionError(f"speculative decoding changed the tokens ({label})")
        ms, plain_ms = t["spec"] * 1e3 / new_tokens, t["plain"] * 1e3 / new_tokens
        rows.append(dict(measure=label, ms=ms, fp32_ms=plain_ms, speedup=plain_ms / ms, drafted=stats["drafted"],
                         kept_pct=100 * stats["accepted"] / max(stats["drafted"], 1), plain_steps=stats["plain"],
                         tokens_per_pass=(new_tokens - 1) / max(stats["rounds"], 1), k=stats["k"]))
    advance(done="speculative")
    return rows


def decode_measure(batch: int, label: str) -> str:
    """The row name of a decode timing. One step makes `batch` tokens (one per row): the time is per step, which
    is per token only at batch 1."""
    return f"decode B={batch} {label}, " + ("ms/token" if batch == 1 else f"ms/step ({batch} tokens)")


def steps(quick=False, n_positions=1024, contend=False, weights=("fp32",), spec=False) -> int:
    nk = 10  # kernel rows per M (kernel_cases)
    ms, ts = sizes(n_positions, quick)
    return (1 + nk * len(ms) + len(ts) + (1 if quick else 2) + (1 if quick else 2) + int(contend)
            + (3 if tuple(weights) != ("fp32",) else 0) + int(spec))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{k['kernel']} M={k['M']}", k["ratio"]) for k in res["kernels"]]
    rows += [(e["measure"], e["ratio"]) for e in res["end_to_end"]]
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(rows) + 1.5))
    names, ratios = zip(*rows)
    ax.barh(range(len(rows)), ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up vs torch / HF eager (higher is better)")
    ax.set_title(f"gpt2kern bench — {res['model']}, {res['device']}, {res['threads']} threads, {res['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

