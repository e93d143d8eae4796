"""Bad-argument fuzz of every op (run by tests/test_crashproof.py in a subprocess, on CPU and on CUDA).

hypothesis draws one op call per example: shapes that fit or are a little off (a dimension one more or less, one
too many or too few, empty), dtypes (mostly float32), devices (on CUDA, now and then a CPU tensor among the CUDA
ones), optional arguments, epilogues, layouts, split counts, counters, unaligned views, and ids, positions, slots and
lengths in and out of range. Every call must either
  - return, with all its tensors on one device and its outputs there; a bad id or position among the rows it
    computes must not pass unreported (on CUDA the check runs on the device: check_cuda_errors raises it); or
  - raise TypeError, ValueError or IndexError with a whole message (crashproof_cases.incomplete: not cut where it
    formats a number, the silent form of the libstdc++ bug).
Anything else fails the example: another exception type (a CUDA launch error, an internal assert), a crash (the
child dies: the parent test names the last EXAMPLE line), or on CUDA an asynchronous fault (each example ends with a
synchronize). The CUDA-only decode ops are drawn on CPU too, where they must refuse CPU tensors.

    python tests/crashproof_fuzz.py DEVICE EXAMPLES
prints `EXAMPLE i <call>` before each call, hypothesis's falsifying example on a failure (exit 1), `DONE n` at
the end. Derandomized (the same examples every run) and bounded: EXAMPLES calls, no database.
"""
import math
import os
import sys

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crashproof_cases import incomplete  # noqa: E402

from gpt2kern import ops  # noqa: E402

F32, F16, BF16, F64, I8, I32, I64, BOOL = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                           torch.int32, torch.int64, torch.bool)
SHORT = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64", I8: "i8", I32: "i32", I64: "i64", BOOL: "bool"}
TYPED = (TypeError, ValueError, IndexError)


class Draw:
    """Draws one call's arguments from hypothesis's `data`, making each tensor on the device under test (or, on
    CUDA, now and then on the CPU), and logs them for the EXAMPLE line."""

    def __init__(self, data, dev):
        self.data, self.dev, self.log, self.tensors = data, dev, [], []

    def __call__(self, strategy):
        return self.data.draw(strategy)

    def pick(self, *choices):
        return self(st.sampled_from(choices))

    def chance(self, percent):
        """True about percent % of the time; False at both ends of the draw's range, which hypothesis favours (its
        all-minimal and all-maximal examples then make plain, valid calls)."""
        return 20 <= self(st.integers(0, 99)) < 20 + percent

    def dim(self, lo=0, hi=9, extra=()):
        return self(st.one_of(st.integers(lo, hi), st.sampled_from(extra))) if extra else self(st.integers(lo, hi))

    def near(self, shape):
        """shape most of the time; else one dim one more or less, or zero, or a dim more or less."""
        shape = list(shape)
        if not shape or not self.chance(15):
            return shape
        i, how = self(st.integers(0, len(shape) - 1)), self(st.integers(0, 4))
        if how == 0:
            shape[i] += 1
        elif how == 1:
            shape[i] = max(shape[i] - 1, 0)
        elif how == 2:
            shape[i] = 0
        elif how == 3:
            shape.insert(i, 1)
        else:
            del shape[i]
        return shape

    def dtype(self, want=F32, others=(F64, F16, I64, BOOL)):
        return self.pick(*others) if self.chance(6) else want

    def device(self):
        return "cpu" if (self.dev != "cpu" and self.chance(6)) else self.dev

    def tensor(self, name, shape, dtype=F32, values=None, device=None):
        """A tensor of `shape` and `dtype` (drawn devices unless `device`); ints from `values` (lo, hi)."""
        dev = device or self.device()
        shape = [int(s) for s in shape]
        if dtype.is_floating_point:
            t = torch.randn(shape, device=dev).to(dtype)
        elif dtype == BOOL:
            t = torch.rand(shape, device=dev) < 0.7
        else:
            lo, hi = values or (-3, 4)
            t = torch.randint(lo, hi, shape, device=dev, dtype=I64).to(dtype)
        self.log.append(f"{name}={shape}:{SHORT.get(dtype, dtype)}{'@cpu' if dev != self.dev else ''}")
        self.tensors.append(t)
        return t

    def ids(self, name, shape, hi, dtype=I64, device=None):
        """Ids in [0, hi), one of them now and then out of range (int32 ids wrap it: outside() judges the result)."""
        dev = device or self.device()
        t = torch.randint(0, max(hi, 1), [int(s) for s in shape], device=dev, dtype=I64)
        if t.numel() and self.chance(25):
            t.view(-1)[self(st.integers(0, t.numel() - 1))] = self.pick(hi, -1, hi + 5, 2**62, -2**63)
        t = t.to(dtype)
        self.log.append(f"{name}={list(t.shape)}:{SHORT.get(dtype, dtype)}{'@cpu' if dev != self.dev else ''}")
        self.tensors.append(t)
        return t

    def opt(self, percent, make):  # make() percent % of the time, else None
        return make() if self.chance(percent) else None

    def note(self, **kw):
        self.log.extend(f"{k}={v!r}" for k, v in kw.items())


def outside(t, table):
    """Whether the integer ids t hold one outside [0, rows of table): a bad id the op must report (float ids and
    malformed tables fail the op's own checks first)."""
    if t is None or t.dtype not in (I64, I32) or t.numel() == 0:
        return False
    hi = table.shape[0] if table.dim() == 2 else 0
    t = t.long()
    return bool(((t < 0) | (t >= hi)).any())


def epilogue(d):
    return "relu" if d.chance(4) else d.pick("none", "gelu_new", "residual")


# ---------------------------------------------------------------- one builder per op: returns (op name, call, bad)

def b_layer_norm(d):
    lead, n = d(st.lists(st.integers(0, 4), max_size=2)), d.dim(0, 9, (64, 129))
    x = d.tensor("x", lead + [n], d.dtype())
    w, b = d.tensor("weight", d.near([n]), d.dtype()), d.tensor("bias", d.near([n]), d.dtype())
    eps = d.pick(1e-5, 0.0, math.nan)
    if d.chance(50):
        r = d.tensor("residual", d.near(lead + [n]), d.dtype())
        return "add_layer_norm", lambda: ops.add_layer_norm(x, r, w, b, eps), False
    return "layer_norm", lambda: ops.layer_norm(x, w, b, eps), False


def b_gelu_pack(d):
    shape = d(st.lists(st.integers(0, 6), max_size=3))
    x = d.tensor("x", shape, d.dtype())
    if d.chance(37):
        return "pack", lambda: ops.pack(x), False
    return "gelu_new", lambda: ops.gelu_new(x), False


def b_conv1d(d):
    lead, K, N = d(st.lists(st.integers(0, 3), max_size=2)), d.dim(0, 9, (32, 40)), d.dim(0, 9, (33, 64))
    x = d.tensor("x", lead + [K], d.dtype())
    wdt = d.pick(F32, F32, F32, F32, F16, BF16, I8, F64)
    cuda = d.dev != "cpu"
    layout = d.pick(*(["kn"] * 6 + ["nk", "panels"] if cuda else ["kn", "kn", "nk", "panels", "panels"]))
    npanels = (N + ops.PANEL - 1) // ops.PANEL
    wshape = {"kn": [K, N], "nk": [N, K], "panels": [npanels, K, ops.PANEL]}[layout]
    if layout == "panels" and wdt == F32 and d.chance(50):  # a real pack
        w = ops.pack(d.tensor("weight (packed)", [K, N], device=x.device.type if d.chance(87) else None))
    else:
        w = d.tensor("weight", d.near(wshape), wdt, values=(-127, 128))
    scales = None
    if wdt == I8 or d.chance(12):
        groups = d.pick(*[g for g in (1, 2, 3, 4) if K % g == 0] or [1]) if K else 1
        sshape = [groups, N] if layout != "panels" else [npanels, groups, ops.PANEL]
        scales = d.tensor("scales", d.near(sshape), d.dtype())
    bias = d.opt(50, lambda: d.tensor("bias", d.near([N]), d.dtype()))
    epi = epilogue(d)
    res = d.opt(90 if epi == "residual" else 5, lambda: d.tensor("residual", d.near(lead + [N]), d.dtype()))
    out_features = d.pick(N, -1, N + 1, max(N - 1, 0), 2**62, N) if layout == "panels" else d.pick(-1, N, N + 1, -1)
    d.note(layout=layout, epilogue=epi, out_features=out_features)
    return "conv1d", lambda: ops.conv1d(x, w, bias, epi, res, out_features, layout, scales), False


def b_attention(d, decode=False):
    B, H, D = d.dim(0, 3), d.dim(0, 3), d.dim(0, 9, (16, 129))
    Tq = d.dim(0, 2) if decode else d.dim(0, 4)
    Tkv = d.dim(0, 8) if d.chance(10) else Tq + d.dim(0, 5)  # (causal queries need Tkv >= Tq)
    q = d.tensor("q", [B, H, Tq, D], d.dtype())
    k = d.tensor("k", d.near([B, H, Tkv, D]), d.dtype())
    if decode and k.dtype == F32 and d.chance(12):  # key rows off 16-byte alignment: the general kernel, not flash
        k = torch.cat([k.new_zeros(1), k.reshape(-1)])[1:].view(k.shape)
        d.tensors[-1] = k
        d.note(k_offset=1)
    v = d.tensor("v", d.near(list(k.shape)), d.dtype())
    key_mask = d.opt(37, lambda: d.tensor("key_mask", d.near([B, d.dim(0, 10)]), d.dtype(BOOL, (F32, I64))))
    scale = d.pick(1.0, 0.125, math.inf)
    if decode:
        L = d.tensor("kv_len", d.near([d.pick(1, B)]), d.dtype(I64, (I32, F32)), values=(-2, Tkv + 3))
        # (no variant: flash-decoding where it applies, Tq = 1, D % 4 == 0 and aligned keys; the general kernel else)
        return "decode_attention", lambda: ops.decode_attention(q, k, v, key_mask, L, scale), False
    bias = d.opt(25, lambda: d.tensor("bias", d.near([d.pick(B, 1), d.pick(H, 1), Tq, d.dim(0, 10)]), d.dtype()))
    causal = d.chance(62)
    q_offset = d.pick(0, Tkv - Tq, -1, d.dim(0, 8), 2**62, Tkv - Tq)
    d.note(causal=causal, q_offset=q_offset)
    return "attention", lambda: ops.attention(q, k, v, key_mask, bias, scale, q_offset, causal), False


def b_decode_attention(d):
    return b_attention(d, decode=True)


def b_embedding(d):
    B, T, n = d.dim(0, 3), d.dim(0, 4), d.dim(0, 8)
    V, P = (d.dim(0, 9) if d.chance(5) else d.dim(1, 9) for _ in range(2))
    ids = d.ids("input_ids", d.near([B, T]), V, d.pick(I64, I64, I64, I32, F32))
    pos = d.ids("position_ids", d.near([d.pick(1, B), T]), P, d.pick(I64, I64, I32))
    tt = d.ids("token_type_ids", d.near([B, T]), V) if d.chance(25) else None
    wte = d.tensor("wte", d.near([V, n]), d.dtype())
    wpe = d.tensor("wpe", d.near([P, n]), d.dtype())
    bad = outside(ids, wte) or outside(pos, wpe) or outside(tt, wte)
    return "embedding", lambda: ops.embedding(ids, wte, wpe, pos, tt), bad


def b_matmul_nk(d):
    lead, K, N = [d.pick(0, 1, 2, 5, 8, 33)], d.dim(0, 9, (40,)), d.dim(0, 9, (33,))
    x = d.tensor("x", lead + [K], d.dtype())
    # the reduced weight modes' [N, K] copies too (variant 2's 16-byte loads), int8 with scales [N, K / group]
    w = d.tensor("weight", d.near([N, K]), d.dtype(F32, (F64, F16, I64, BOOL, torch.bfloat16, torch.int8)),
                 values=(-127, 128))
    sc = d.opt(80 if w.dtype == torch.int8 else 5,
               lambda: d.tensor("scales", d.near([N, d.pick(1, 2, 4)]), d.dtype()))
    bias = d.opt(50, lambda: d.tensor("bias", d.near([N]), d.dtype()))
    epi = epilogue(d)
    res = d.opt(90 if epi == "residual" else 5, lambda: d.tensor("residual", d.near(lead + [N]), d.dtype()))
    d.note(epilogue=epi)
    return "matmul_nk", lambda: ops.matmul_nk(x, w, bias, epi, res, sc), False


def b_matmul_prefill(d):
    M, K, N = d.pick(0, 1, 3, 33, 130), d.dim(0, 9, (40,)), d.dim(0, 9, (33,))
    x = d.tensor("x", [M, K], d.dtype())
    w = d.tensor("weight", d.near([K, N]), d.dtype())
    bias = d.opt(50, lambda: d.tensor("bias", d.near([N]), d.dtype()))
    epi = epilogue(d)
    res = d.opt(90 if epi == "residual" else 5, lambda: d.tensor("residual", d.near([M, N]), d.dtype()))
    splits = d.pick(0, 0, 1, 3, 64, -1, 65)
    d.note(epilogue=epi, splits=splits)
    return "matmul_prefill", lambda: ops.matmul_prefill(x, w, bias, epi, res, splits), False


def b_kv_write(d):
    B, H, Tmax, D = d.dim(0, 3), d.dim(1, 3), d.dim(0, 6), d.dim(1, 5)
    E = H * D
    qkv = d.tensor("qkv", d.near(d.pick([B, 3 * E], [B, 1, 3 * E])), d.dtype())
    kc = d.tensor("k_cache", d.near([B, H, Tmax, D]), d.dtype())
    vc = d.tensor("v_cache", d.near(list(kc.shape)), d.dtype())
    slot = d.tensor("slot", d.near([1]), d.dtype(I64, (I32, F32)), values=(-2, Tmax + 2))
    return "kv_write", lambda: ops.kv_write(qkv, kc, vc, slot), False


def b_matmul_decode(d):
    M, K = d.pick(0, 1, 2, 5, 9, 33), d.dim(0, 9, (40,))
    wdt = d.pick(F32, F32, F32, F16, BF16, I8)
    caches = d.chance(37)
    if caches:  # c_attn with the K/V store: N = 3E
        H, D, Tmax = d.dim(1, 2), d.dim(1, 3), d.dim(0, 4)
        N = 3 * H * D
    else:
        N = d.dim(0, 9, (33, 70))
    x = d.tensor("x", [M, K], d.dtype())
    w = d.tensor("weight", d.near([K, N]), wdt, values=(-127, 128))
    scales = None
    if wdt == I8 or d.chance(12):
        groups = d.pick(*[g for g in (1, 2, 4) if K % g == 0] or [1]) if K else 1
        scales = d.tensor("scales", d.near([groups, N]), d.dtype())
    bias = d.opt(37, lambda: d.tensor("bias", d.near([N]), d.dtype()))
    epi = epilogue(d)
    res = d.opt(90 if epi == "residual" else 5, lambda: d.tensor("residual", d.near([M, N]), d.dtype()))
    counters = None  # float32 weights: the staged GEMV, with counters the one without a finish kernel; refused else
    if d.chance(50):
        counters = d.tensor("counters", d.near([(N + 31) // 32]), d.dtype(I32, (I64,)), values=(0, 1))
    kw = {}
    if caches:
        kw["k_cache"] = d.tensor("k_cache", d.near([M, H, Tmax, D]), d.dtype())
        kw["v_cache"] = d.tensor("v_cache", d.near(list(kw["k_cache"].shape)), d.dtype())
        kw["slot"] = d.tensor("slot", d.near([1]), d.dtype(I64, (I32,)), values=(-2, Tmax + 2))
        if d.chance(12):  # one of the three left out
            del kw[d.pick("k_cache", "v_cache", "slot")]
    d.note(epilogue=epi)
    return "matmul_decode", lambda: ops.matmul_decode(x, w, bias, epi, res, scales, counters=counters, **kw), False


def b_embedding_step(d):
    B, V, P, n = d.dim(0, 3), d.dim(1, 9), d.dim(1, 9), d.dim(0, 8)
    ids = d.ids("input_ids", d.near([B, 1]), V, d.pick(I64, I64, I32))
    wte = d.tensor("wte", d.near([V, n]), d.dtype())
    wpe = d.tensor("wpe", d.near([P, n]), d.dtype())
    cur = [d.dim(0, 5), d.dim(0, 5)] + [d(st.integers(-2, P)) for _ in range(B)]
    dev = d.device()
    cursor = torch.tensor(cur, dtype=I64, device=dev)
    if d.chance(12):
        cursor = cursor[:-1] if d.chance(50) else cursor.int()
    d.tensors.append(cursor)
    d.log.append(f"cursor={cursor.tolist()}:{SHORT[cursor.dtype]}{'@cpu' if dev != d.dev else ''}")
    bad = outside(ids, wte) or outside(cursor[2:] + 1, wpe)  # each row's new position is its cursor entry + 1
    return "embedding_step", lambda: ops.embedding_step(ids, wte, wpe, cursor), bad


SHARED = [b_layer_norm, b_layer_norm, b_gelu_pack, b_conv1d, b_conv1d, b_conv1d, b_attention, b_attention,
          b_embedding, b_embedding]  # the ops with CPU and CUDA kernels
CUDA_ONLY = [b_decode_attention, b_matmul_nk, b_matmul_prefill, b_kv_write, b_matmul_decode, b_matmul_decode,
             b_embedding_step]


def b_cuda_only(d):  # on CPU the decode ops only refuse CPU tensors: one draw among them
    return d(st.sampled_from(CUDA_ONLY))(d)


def run(dev, examples):
    cuda = dev != "cpu"
    count = [0]
    builders = SHARED + (CUDA_ONLY if cuda else [b_cuda_only])

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              phases=(Phase.explicit, Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        d = Draw(data, dev)
        op, call, bad = d(st.sampled_from(builders))(d)
        count[0] += 1
        print(f"EXAMPLE {count[0]} {op}({', '.join(d.log)})", flush=True)
        devices = {t.device for t in d.tensors}
        try:
            out = call()
            if cuda and op in ("embedding", "embedding_step"):
                ops.check_cuda_errors()  # the ids' range check ran on the device
        except TYPED as e:
            cut = incomplete(str(e))
            assert cut is None, f"{op}: {type(e).__name__} message cut short ({cut}): {e}"
            print(f"  -> {type(e).__name__}: {str(e)[:200]}", flush=True)
        else:
            print("  -> returned", flush=True)
            assert len(devices) <= 1, f"{op} returned for tensors on {sorted(map(str, devices))}"
            for o in out if isinstance(out, tuple) else (out,):
                assert o is None or o.device in devices, f"{op} returned a tensor on {o.device}, inputs on {devices}"
            rows = out.numel() if isinstance(out, torch.Tensor) else 0  # (rows of width 0 compute nothing)
            assert not (bad and rows), f"{op} returned without reporting a bad id or position (IndexError)"
        finally:
            if cuda:  # an asynchronous fault of this call's kernels, or a bad id it left unreported
                torch.cuda.synchronize()
                ops.check_cuda_errors(synchronize=False)

    fuzz()
    print(f"DONE {count[0]}", flush=True)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
