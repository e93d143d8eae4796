"""CudaGraphDecoder: GPT-2's decode step (body.blocks on gpt2kern's CUDA ops) captured once in a CUDA graph and
replayed; greedy, with HF generate's tokens.

    dec = CudaGraphDecoder(model, batch_size=B, max_len=T + n)  # a float32 CUDA model; captures the step
    tokens = dec.generate(ids, max_new_tokens=n, attention_mask=mask)  # [B, T + n]
    logits = dec.prefill(ids, attention_mask=mask)              # or step by step, with no host sync in the loop:
    for _ in range(n):
        logits = dec.step(logits.argmax(-1))                    # [B, V], a static buffer the next step overwrites

State (static shapes, allocated once on the model's GPU):
    k_cache, v_cache  [n_layer, B, H, max_len, D]  slot j of row b: that row's j-th token (prompt included)
    key_mask          [B, max_len] bool             False at the prompt's (left) padding
    cursor            [2 + B] int64                 slot, kv_len = slot + 1, then each row's position of the last
                                                    token written (views: slot, kv_len, pos); a step advances it first
    ids               [B, 1] int64                  the token a step appends
The step's kernels are the variants of RULES (dec.variants; the defaults per GPU: cuda_variants.json), launched
plainly or (launch=2, sm_90+) with programmatic dependent launch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json

import torch

from ..kernels import cuda_table, ops
from ..model import guard
from ..model.body import MATMULS, blocks
from ..model.dropin import hf_position_ids, state_of


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel variant of the decode step: what it runs, and the rules refusals() and the step read."""
    what: str
    matmul: str | None = None  # the step's matmuls: 'nk' (matmul_nk), 'decode' (matmul_decode), 'prefill'
    #                            (matmul_prefill under prefill_gemm 3); None: step_matmul's
    fp32_only: bool = False  # reads fp32 weights: the reduced modes run conv1d's GEMV or gemv 2
    given_unless_fp32: bool = False  # the table (measured with fp32 weights) chooses it for fp32 only; other modes
    # run it when it is given
    decode_rows: bool = False  # runs decode GEMVs: at most ops.GEMV_MAX_ROWS rows
    counters: bool = False  # split-K ticket counters, one per 32 output columns
    kv_in_gemv: bool = False  # c_attn's GEMV stores K/V and the embedding kernel advances the cursor
    not_after: dict = dataclasses.field(default_factory=dict)  # {gemv variant: why this one cannot follow it}
    min_sm: int = 0  # the GPU's compute capability it needs, as 10·major + minor


# The one statement of the step's variants and which combine (csrc/cuda/ops_cuda.cpp checks the same per op).
RULES = {
    "gemv": {
        2: Variant("matmul_nk on [out, in] copies of the block and lm_head weights (double the weights' memory), in "
                   "every weight mode: fp32 float4 loads, fp16/bf16/int8 16-byte loads (int8: + [out, in / group] "
                   "scales); chosen from the table for fp32 only (measured there), given for the others",
                   matmul="nk", decode_rows=True, given_unless_fp32=True),
        3: Variant("ops.matmul_decode: conv1d's split-K GEMV with x in shared memory; bitwise conv1d",
                   matmul="decode", fp32_only=True, decode_rows=True),
        4: Variant("gemv 3 without finish kernels: the last block per 32 columns sums the partials; bitwise conv1d",
                   matmul="decode", fp32_only=True, decode_rows=True, counters=True),
        5: Variant("ops.matmul_prefill with prefill GEMM variant 3 (3xTF32 tensor cores, split-K) at the decode rows",
                   matmul="prefill", fp32_only=True, decode_rows=True),
        None: Variant("(chosen, never given) conv1d's own path: the reduced modes' GEMV, or the GEMM over 32 rows"),
    },
    "kv_write": {
        2: Variant("one ops.kv_write kernel per layer writes K and V at the device-side slot"),
        3: Variant("c_attn's GEMV (ops.matmul_decode) stores K/V at the slot; the embedding advances the cursor",
                   matmul="decode", decode_rows=True, kv_in_gemv=True,
                   not_after={g: f"kv_write=3 stores K/V from an [in, out] GEMV (gemv 3 or 4, or the reduced weight "
                                 f"modes'); gemv={g} takes kv_write=2" for g in (2, 5)}),
    },
    "launch": {
        1: Variant("plain launches: each kernel of the step starts when the previous one has ended"),
        2: Variant("programmatic dependent launch (ops.cuda_pdl): each kernel starts while the previous one runs, the "
                   "GEMVs prefetch their weights into L2 meanwhile, and it waits on the device for its inputs; bitwise "
                   "launch 1's results", min_sm=90),
    },
}
# what a table entry without a variant's key measured: a table written before that variant existed
ABSENT = {"launch": 1}
VARIANTS = {name: tuple(v for v in rows if v is not None) for name, rows in RULES.items()}  # those a caller gives
# a GPU not in the table: the first GPU measured's winning sets (B=1 below 32 rows, B=32 from 32 on)
UNLISTED = {"1": dict(gemv=2, kv_write=2, launch=1), "32": dict(gemv=3, kv_write=3, launch=1)}
TABLE = cuda_table.TABLE  # gpt2kern/decode/cuda_variants.json (its "prefill" entries: kernels/cuda_table.py)


def variant_table(path: str | None = None) -> dict:
    """The measured defaults (TABLE unless `path`): {gpu name: {"by_batch": {"B": {"gemv": g, "kv_write": k}},
    "measured": how}}."""
    with open(path or TABLE) as f:
        return json.load(f)["gpus"]


def _measured(by_batch: dict, batch_size: int) -> dict | None:
    """by_batch's variants at the largest measured batch size <= batch_size (else the smallest); None when there are
    none or they name a variant this gpt2kern does not have (a table from a newer one); a key it lacks is ABSENT's.
    Other keys are not read."""
    if not by_batch:
        return None
    sizes = sorted(int(b) for b in by_batch)
    at = max((b for b in sizes if b <= batch_size), default=sizes[0])
    got = {k: by_batch[str(at)].get(k, ABSENT.get(k)) for k in VARIANTS}
    return got if all(got[k] in VARIANTS[k] for k in VARIANTS) else None


def refusals(v: dict, batch_size: int, mode: str = "fp32", sm: int | None = None) -> dict:
    """Why the variants `v` cannot run a decoder of batch_size rows over `mode` weights on a GPU of compute capability
    sm (10·major + minor; None: not checked): {name: reason}, empty when they can (RULES says which combine)."""
    why = {}
    rows = f"takes batch_size <= {ops.GEMV_MAX_ROWS} (a decode GEMV's rows), got {batch_size}"
    v = {**ABSENT, **v}  # (a variant left out: ABSENT's)
    for name, rules in RULES.items():
        r = rules[v[name]]
        if sm is not None and sm < r.min_sm:
            why[name] = f"{name}={v[name]} needs an sm_{r.min_sm} or newer GPU, this one is sm_{sm}"
        elif r.fp32_only and mode != "fp32":
            why[name] = (f"{name}={v[name]} reads fp32 weights; weights={mode!r} run conv1d's GEMV (leave {name} "
                         f"unset) or gemv=2")
        elif v["gemv"] in r.not_after:
            why[name] = r.not_after[v["gemv"]]
        elif r.decode_rows and not 1 <= batch_size <= ops.GEMV_MAX_ROWS:
            why[name] = f"{name}={v[name]} {rows}"
    return why


def _runs_everywhere(name: str):
    """The variant of `name` that RULES restricts in nothing: where a chosen one that cannot run steps back to."""
    return next(k for k, r in RULES[name].items() if not (r.fp32_only or r.decode_rows or r.not_after or r.min_sm))


def step_matmul(v: dict) -> str:
    """The kernel of the step's matmuls under variants `v`: gemv's, else kv_write's (its c_attn must be a decode
    GEMV), else conv1d's: 'nk', 'decode' or 'conv1d'."""
    return RULES["gemv"][v["gemv"]].matmul or RULES["kv_write"][v["kv_write"]].matmul or "conv1d"


def default_variants(gpu: str, batch_size: int, mode: str = "fp32", given: dict | None = None,
                     table: dict | None = None, sm: int | None = None) -> dict:
    """The decoder's variants: those `given` (not None), the rest from the table's entry for this GPU at the largest
    measured batch size <= batch_size (else the smallest), or UNLISTED's when the GPU has none. A chosen variant that
    this call cannot run (refusals), or that the table chose for fp32 weights only (given_unless_fp32: gemv 2 over
    the reduced modes), is stepped back: gemv to None (conv1d's path), kv_write=3 to 2; a given one is kept (the
    constructor refuses it with the reason). sm: the GPU's compute capability, as refusals'."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    by_batch = (variant_table() if table is None else table).get(gpu, {}).get("by_batch", {})
    v = {**(_measured(by_batch, batch_size) or _measured(UNLISTED, batch_size)), **given}
    for name in RULES:  # gemv first: kv_write's refusals depend on it
        if name not in given and (name in refusals(v, batch_size, mode, sm)
                                  or (RULES[name][v[name]].given_unless_fp32 and mode != "fp32")):
            v[name] = _runs_everywhere(name)
    return v


class CudaGraphDecoder:
    """Greedy decoding of `model` (HF's GPT-2 LM head model, float32 on CUDA, that guard.why_not(..., "cuda_graph")
    lets it stand in for) in batch_size rows of up to max_len tokens. gemv, kv_write, launch: the step's variants
    (RULES; unset: default_variants); weights: 'fp32', 'fp16', 'bf16' or 'int8' (default: the optimized model's mode);
    use_graph=False runs the same step eagerly. The weights are read here: build the decoder after they are final."""

    def __init__(self, model, batch_size: int, max_len: int, use_graph: bool = True, warmup: int = 2,
                 gemv: int | None = None, weights: str | None = None, kv_write: int | None = None,
                 launch: int | None = None):
        if not ops.has_cuda():
            raise RuntimeError("gpt2kern was built without its CUDA kernels")
        given = dict(gemv=gemv, kv_write=kv_write, launch=launch)
        for name, v in given.items():
            if v is not None and v not in VARIANTS[name]:
                raise ValueError(f"{name} must be one of {VARIANTS[name]}, got {v!r}")
        st = state_of(model, weights)  # the optimized model's packs, or a private pack (the model untouched)
        why = guard.why_not(st, "cuda_graph", model=model)
        if why is not None:
            raise ValueError(f"CudaGraphDecoder cannot stand in for this model's forward: {why}")
        major, minor = torch.cuda.get_device_capability(st.device)
        sm = 10 * major + minor
        self.variants = default_variants(torch.cuda.get_device_name(st.device), int(batch_size), st.weights.mode,
                                         given, sm=sm)
        why = refusals(self.variants, int(batch_size), st.weights.mode, sm)
        if why:
            raise ValueError("; ".join(why.values()))
        gemv, kv_write = RULES["gemv"][self.variants["gemv"]], RULES["kv_write"][self.variants["kv_write"]]
        cfg = model.config
        if not 1 <= max_len <= cfg.n_positions:
            raise ValueError(f"max_len must be in [1, n_positions={cfg.n_positions}], got {max_len}")
        W = st.weights  # weights.Weights: the same layer records the CPU walk and engine read
        self.model, self.device, self.W = model, st.device, W
        self.B, self.Tmax = int(batch_size), int(max_len)
        self.E, self.H = cfg.n_embd, W.n_head
        self.D = self.E // self.H
        self.V = W.lm_head.n_out
        self._kv_in_gemv = kv_write.kv_in_gemv
        self._pdl = self.variants["launch"] == 2
        self._step_matmul = getattr(self, f"_mm_{step_matmul(self.variants)}")
        dev = self.device
        L, B, H, D = len(W.layers), self.B, self.H, self.D
        lins = {(i, which): getattr(x, which) for i, x in enumerate(W.layers) for which in MATMULS}
        self._lins = {**lins, (None, "lm_head"): W.lm_head}  # the step's matmuls by (layer, which)
        with torch.cuda.device(dev):
            self.k_cache = torch.zeros(L, B, H, self.Tmax, D, device=dev)
            self.v_cache = torch.zeros(L, B, H, self.Tmax, D, device=dev)
            self.key_mask = torch.ones(B, self.Tmax, dtype=torch.bool, device=dev)
            self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.cursor = torch.zeros(2 + B, dtype=torch.long, device=dev)
            self.slot, self.kv_len, self.pos = self.cursor[0:1], self.cursor[1:2], self.cursor[2:].view(B, 1)
            # matmul_nk reads [out, in] copies of the 'kn' Linears (data [in, out]) in their mode, int8 with scales
            # [out, in / group] (WeightFormat.nk_copy: the same stored values), by (layer, which)
            self._nk = ({key: (*lin.fmt.nk_copy(lin.data, lin.scales)[1:], lin.bias)
                         for key, lin in self._lins.items()} if gemv.matmul == "nk" else None)
            # one split-K ticket counter per 32 output columns, shared by the step's GEMVs (they run one after
            # another); each GEMV leaves its counters at zero
            self._counters = (torch.zeros((max(x.n_out for x in self._lins.values()) + 31) // 32, dtype=torch.int32,
                                          device=dev) if gemv.counters else None)
        self.length = 0  # slots written (host-side count: no sync needed to know it)
        self.graph = None
        self.logits = None
        self.launches_per_token = None  # the captured step's nodes by type (set by the capture)
        if use_graph:
            with torch.cuda.device(dev):  # capture on the model's GPU, whichever is current
                self._capture(warmup)
        self.reset()

    def _capture(self, warmup):
        dev = self.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # allocator and lazy init off the capture
                self._step_body()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = self._step_body()  # (launch 2: the graph keeps the programmatic edges)
            self.launches_per_token = ops.capture_node_counts()  # from the capture: any torch reaches it

    def reset(self):
        """Forget the sequence: empty cache (key_mask all True: no padding), slot, length and positions 0."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.key_mask.fill_(True)
        self.cursor.zero_()
        self.length = 0

    # ------------------------------------------------------------ the step's matmuls: (layer, which, x, epilogue)

    def _mm_conv1d(self, i, which, x, epilogue):
        return self._lins[i, which](x, epilogue)

    def _mm_nk(self, i, which, x, epilogue):
        w, s, b = self._nk[i, which]
        return ops.matmul_nk(x, w, b, epilogue, None, s)

    def _mm_prefill(self, i, which, x, epilogue):  # gemv 5: the step runs under prefill_gemm 3 (_step_body)
        lin = self._lins[i, which]
        return ops.matmul_prefill(x, lin.data, lin.bias, epilogue)

    def _mm_decode(self, i, which, x, epilogue):  # gemv 3 or 4 (counters), or a reduced mode's GEMV
        lin = self._lins[i, which]
        caches = {}
        if which == "c_attn" and self._kv_in_gemv:  # c_attn stores K/V at the slot as it writes them
            caches = dict(k_cache=self.k_cache[i], v_cache=self.v_cache[i], slot=self.slot)
        return ops.matmul_decode(x, lin.data, lin.bias, epilogue, None, lin.scales, counters=self._counters,
                                 **caches)

    def _step_body(self):
        with contextlib.ExitStack() as on:  # the process-wide kernel settings the variants need, for this step only
            if self._pdl:
                on.enter_context(ops.cuda_pdl(True))
            if self._step_matmul == self._mm_prefill:
                on.enter_context(ops.using_cuda_variant("prefill_gemm", 3))
            return self._step_kernels()

    def _step_kernels(self):
        # the new token's slot, kv_len and positions: the cursor advanced by one first
        if self._kv_in_gemv:  # inside the embedding kernel
            h = ops.embedding_step(self.ids, self.W.wte, self.W.wpe, self.cursor)
        else:
            self.cursor.add_(1)
            h = ops.embedding(self.ids, self.W.wte, self.W.wpe, self.pos)

        def attend(i, q, k, v, qkv):  # over slots [0, kv_len) only: kv_len is read on the device
            if not self._kv_in_gemv:  # one kernel writes both, at the slot read on the device
                ops.kv_write(qkv, self.k_cache[i], self.v_cache[i], self.slot)
            return ops.decode_attention(q, self.k_cache[i], self.v_cache[i], self.key_mask, self.kv_len,
                                        self.W.layers[i].scale)

        x = blocks(self.W, h, attend, self._step_matmul)
        return self._step_matmul(None, "lm_head", x, "none").view(self.B, self.V)

    # ------------------------------------------------------------ public

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """Run the prompt [B, T] (left-padded if attention_mask has zeros); returns [B, V] last-position logits."""
        B, T = input_ids.shape
        if B != self.B or not 1 <= T < self.Tmax:
            raise ValueError(f"input_ids must be [{self.B}, T] with 1 <= T < max_len={self.Tmax}, "
                             f"got {tuple(input_ids.shape)}")
        with torch.cuda.device(self.device):
            ids = input_ids.to(self.device)
            mask = (torch.ones(B, T, dtype=torch.bool, device=self.device) if attention_mask is None
                    else attention_mask.to(self.device) != 0)
            self.reset()
            pos = hf_position_ids(mask)
            self.key_mask[:, :T] = mask
            km = None if attention_mask is None else self.key_mask[:, :T]

            def attend(i, q, k, v, qkv):  # causal, over slots [0, T)
                self.k_cache[i, :, :, :T].copy_(k)
                self.v_cache[i, :, :, :T].copy_(v)
                return ops.attention(q, self.k_cache[i, :, :, :T], self.v_cache[i, :, :, :T], km, None,
                                     self.W.layers[i].scale, 0, True)

            x = blocks(self.W, ops.embedding(ids, self.W.wte, self.W.wpe, pos), attend)
            logits = self.W.lm_head(x[:, -1:]).view(B, self.V)
            # the last token written: slot T - 1, kv_len T, each row's last position (a step advances them first)
            self.pos.copy_(pos[:, -1:])
            self.slot.fill_(T - 1)
            self.kv_len.fill_(T)
        self.length = T
        return logits

    @torch.no_grad()
    def step(self, next_ids):
        """Append one token per row ([B] or [B, 1]) and return the [B, V] logits after it (a static buffer when
        the graph is used: the next step overwrites it)."""
        if self.length == 0:
            raise RuntimeError("call prefill() first")
        if self.length >= self.Tmax:
            raise ValueError(f"the cache is full (max_len={self.Tmax})")
        self.ids.copy_(next_ids.reshape(self.B, 1))
        self.length += 1
        with torch.cuda.device(self.device):
            if self.graph is None:
                return self._step_body()
            self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, attention_mask=None):
        """Greedy decoding: [B, T + max_new_tokens] token ids (no early stop at EOS). Ends with one sync, which
        raises the IndexError of a token id outside the vocabulary (checked on the device meanwhile)."""
        logits = self.prefill(input_ids, attention_mask)
        out = [input_ids.to(self.device)]
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        tokens = torch.cat(out, 1)
        ops.check_cuda_errors()
        return tokens
