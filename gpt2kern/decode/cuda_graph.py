"""CUDA decode engine: GPT-2's decode step on gpt2kern's CUDA ops, captured once in a CUDA graph and replayed.

    from gpt2kern.decode.cuda_graph import CudaGraphDecoder
    model = GPT2LMHeadModel(...).cuda().eval()            # float32; gpt2kern.optimize() is not needed
    dec = CudaGraphDecoder(model, batch_size=B, max_len=T + n)   # allocates the static cache, captures the graph
    tokens = dec.generate(ids, max_new_tokens=n, attention_mask=mask)   # greedy, [B, T + n], same as HF greedy
    # or step by step (no host sync anywhere in the loop):
    logits = dec.prefill(ids, attention_mask=mask)        # [B, V] logits of each row's last position
    for _ in range(n):
        logits = dec.step(logits.argmax(-1))              # [B, V]: one CUDA graph replay

State, all preallocated in __init__ on the model's device (static shapes: batch_size and max_len are fixed):
  k_cache, v_cache  [n_layer, B, H, max_len, D]  slot j of row b holds that row's j-th token (prompt included)
  key_mask          [B, max_len] bool             False for the prompt's padding; True elsewhere
  cursor            [2 + B] int64                 [slot, kv_len = slot + 1, pos of each row] of the last token
                                                  written: views slot [1], kv_len [1], pos [B, 1]; a step first
                                                  advances all three by one (to the new token's)
  ids               [B, 1] int64                  the next token
A step (the captured graph) writes the new token's K/V into `slot` (kv_write below) and attends over the first
kv_len slots only (decode_attention, flash-decoding, reads kv_len on the device: the work grows with the tokens so
far, not with max_len; key_mask hides the padding). The cursor advances at the step's start: one add_(1), or
(kv_write=3) inside the embedding kernel. prefill() runs the prompt eagerly with the same ops (causal attention
over slots [0, T)), resets the state and fills slots [0, T). Left padding follows HF generate
(model.dropin.hf_position_ids). Logits come back in a static buffer that the next step overwrites (clone it to keep it).
Everything runs under torch.cuda.device(model's device), whichever device is current.
Weights are the layer records of weights.py (the optimized model's packs, or a private pack in the mode `weights`
asks for: fp16, bf16 and int8 run the same step over their [in, out] CUDA copies, csrc/cuda/matmul_lowp.cu), taken at
construction, after guard.why_not(..., "cuda_graph") agreed to stand in for the model (hooks, wrappers such as LoRA
and patched forwards are refused): build the decoder after the weights are final. use_graph=False runs the same
step eagerly (for comparison and debugging).

Kernel variants of the step: those that won a measurement somewhere (bench/gpu_bench.py times them; the step's
attention is always flash-decoding). A variant not given comes from gpt2kern/decode/cuda_variants.json: the fastest decoder
with HF's tokens that gpu_bench measured on this GPU model at the nearest batch size (default_variants); on a GPU
not in it, the sets that won on the GPU measured (UNLISTED). dec.variants says which ran; refusals() says which
cannot run a call, and the chooser steps those back.
  gemv=2       matmul_nk on [out, in] copies of the block and lm_head weights (one warp per output column, no
               finish kernel); the copies double the weights' memory (prefill keeps conv1d); fp32 weights only
  gemv=3       ops.matmul_decode: conv1d's split-K GEMV with x staged in shared memory, read as float4 (for
               M = 9…32 rows, where its x loads outnumber its FMAs); bitwise conv1d; fp32 weights only
  gemv=4       gemv 3 without finish kernels: the last block of each 32 columns sums the split-K partials (a
               counter per column group, owned by the decoder, back to zero after each GEMV); bitwise conv1d
  gemv=None    (chosen, never given) conv1d's own path: the fp16 / bf16 / int8 weight modes' GEMV, or over 32 rows
               the prefill GEMM
  kv_write=2   one ops.kv_write kernel per layer writes K and V from c_attn's output at the device-side slot
  kv_write=3   no bookkeeping launch at all: c_attn's GEMV stores K and V at the slot as it writes them
               (ops.matmul_decode with the caches: in its epilogue or its split-K finish kernel), and the embedding
               kernel advances the cursor (ops.embedding_step); gemv 3 or 4, or the reduced modes' GEMV
gemv 2-4 and kv_write=3 run decode GEMVs, which take at most GEMV_MAX_ROWS = 32 rows.
launches_per_token: the captured step's graph nodes by type (kernel, memcpy, memset, other, total).
Bad token ids: the embedding kernel checks them on the device (NaN rows); generate() checks once at its end.
"""
from __future__ import annotations

import json
import os

import torch

from ..kernels import ops
from ..model import guard
from ..model.dropin import hf_position_ids, state_of


VARIANTS = {"gemv": (2, 3, 4), "kv_write": (2, 3)}
# a GPU not in the table: the first GPU measured's winning sets (H200: B=1 below 32 rows, B=32 from 32 on)
UNLISTED = {"1": dict(gemv=2, kv_write=2), "32": dict(gemv=3, kv_write=3)}
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_variants.json")


def variant_table(path: str | None = None) -> dict:
    """The measured defaults (TABLE unless `path`): {gpu name: {"by_batch": {"B": {"gemv": g, "kv_write": k}},
    "measured": how}}."""
    with open(path or TABLE) as f:
        return json.load(f)["gpus"]


def _measured(by_batch: dict, batch_size: int) -> dict | None:
    """by_batch's variants at the largest measured batch size <= batch_size (else the smallest); None when there are
    none or they name a variant this gpt2kern does not have (a table from a newer one). Other keys are not read."""
    if not by_batch:
        return None
    sizes = sorted(int(b) for b in by_batch)
    at = max((b for b in sizes if b <= batch_size), default=sizes[0])
    got = {k: by_batch[str(at)].get(k) for k in VARIANTS}
    return got if all(got[k] in VARIANTS[k] for k in VARIANTS) else None


def refusals(v: dict, batch_size: int, mode: str = "fp32") -> dict:
    """Why the variants `v` cannot run a decoder of batch_size rows over `mode` weights: {name: reason}, empty when
    they can. gemv None (conv1d's own path) runs everywhere. The one statement of which variants combine."""
    why = {}
    narrow = 1 <= batch_size <= ops.GEMV_MAX_ROWS
    rows = f"takes batch_size <= {ops.GEMV_MAX_ROWS} (a decode GEMV's rows), got {batch_size}"
    g, k = v["gemv"], v["kv_write"]
    if g is not None and mode != "fp32":
        why["gemv"] = f"gemv={g} reads fp32 weights; weights={mode!r} run conv1d's GEMV (leave gemv unset)"
    elif g is not None and not narrow:
        why["gemv"] = f"gemv={g} {rows}"
    if k == 3 and g == 2:
        why["kv_write"] = ("kv_write=3 stores K/V from an [in, out] GEMV (gemv 3 or 4, or the reduced weight modes'); "
                           "gemv=2 takes kv_write=2")
    elif k == 3 and not narrow:
        why["kv_write"] = f"kv_write=3 {rows}"
    return why


def default_variants(gpu: str, batch_size: int, mode: str = "fp32", given: dict | None = None,
                     table: dict | None = None) -> dict:
    """The decoder's variants: those `given` (not None), the rest from the table's entry for this GPU at the largest
    measured batch size <= batch_size (else the smallest), or UNLISTED's when the GPU has none. A chosen variant that
    this call cannot run (refusals) is stepped back: gemv to None (conv1d's path), kv_write=3 to 2; a given one is
    kept (the constructor refuses it with the reason)."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    by_batch = (variant_table() if table is None else table).get(gpu, {}).get("by_batch", {})
    v = {**(_measured(by_batch, batch_size) or _measured(UNLISTED, batch_size)), **given}
    if "gemv" not in given and "gemv" in refusals(v, batch_size, mode):
        v["gemv"] = None
    if "kv_write" not in given and "kv_write" in refusals(v, batch_size, mode):
        v["kv_write"] = 2
    return v


class CudaGraphDecoder:
    def __init__(self, model, batch_size: int, max_len: int, use_graph: bool = True, warmup: int = 2,
                 gemv: int | None = None, weights: str | None = None, kv_write: int | None = None):
        if not ops.has_cuda():
            raise RuntimeError("gpt2kern was built without its CUDA kernels")
        given = dict(gemv=gemv, kv_write=kv_write)
        for name, v in given.items():
            if v is not None and v not in VARIANTS[name]:
                raise ValueError(f"{name} must be one of {VARIANTS[name]}, got {v!r}")
        st = state_of(model, weights)  # the optimized model's packs, or a private pack (the model untouched)
        why = guard.why_not(st, "cuda_graph", model=model)
        if why is not None:
            raise ValueError(f"CudaGraphDecoder cannot stand in for this model's forward: {why}")
        self.variants = default_variants(torch.cuda.get_device_name(st.device), int(batch_size), st.weights.mode,
                                         given)
        why = refusals(self.variants, int(batch_size), st.weights.mode)
        if why:
            raise ValueError("; ".join(why.values()))
        gemv, kv_write = self.variants["gemv"], self.variants["kv_write"]
        cfg = model.config
        if not 1 <= max_len <= cfg.n_positions:
            raise ValueError(f"max_len must be in [1, n_positions={cfg.n_positions}], got {max_len}")
        W = st.weights  # weights.Weights: the same layer records the CPU walk and engine read
        self.model, self.device, self.W = model, st.device, W
        self.B, self.Tmax = int(batch_size), int(max_len)
        self.E, self.H = cfg.n_embd, W.n_head
        self.D = self.E // self.H
        self.V = W.lm_head.n_out
        self.gemv_variant, self.kv_write_variant = gemv, kv_write
        dev = self.device
        L, B, H, D = len(W.layers), self.B, self.H, self.D
        with torch.cuda.device(dev):
            self.k_cache = torch.zeros(L, B, H, self.Tmax, D, device=dev)
            self.v_cache = torch.zeros(L, B, H, self.Tmax, D, device=dev)
            self.key_mask = torch.ones(B, self.Tmax, dtype=torch.bool, device=dev)
            self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.cursor = torch.zeros(2 + B, dtype=torch.long, device=dev)
            self.slot, self.kv_len, self.pos = self.cursor[0:1], self.cursor[1:2], self.cursor[2:].view(B, 1)
            # gemv=2: [out, in] copies for the step's matmuls, one tuple per layer, then lm_head
            self._nk = None
            if gemv == 2:
                def nk(lin):  # (an fp32 'kn' Linear: data is [in, out])
                    return lin.data.t().contiguous(), lin.bias
                self._nk = [tuple(nk(lin) for lin in (x.c_attn, x.attn_proj, x.c_fc, x.mlp_proj)) for x in W.layers]
                self._nk_head = nk(W.lm_head)
            # gemv=4: one split-K ticket counter per 32 output columns, shared by the step's GEMVs (they run one
            # after another); each GEMV leaves its counters at zero
            self._counters = None
            if gemv == 4:
                widest = max([W.lm_head.n_out] + [x.n_out for L in W.layers
                                                  for x in (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)])
                self._counters = torch.zeros((widest + 31) // 32, dtype=torch.int32, device=dev)
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
            self.logits = self._step_body()
            self.launches_per_token = ops.capture_node_counts()  # from the capture: any torch reaches it

    def reset(self):
        """Forget the sequence: empty cache (key_mask all True: no padding), slot, length and positions 0."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.key_mask.fill_(True)
        self.cursor.zero_()
        self.length = 0

    # ------------------------------------------------------------ the body, shared by prefill and step

    def _layers(self, h, write, attend, mm):
        """The GPT-2 blocks on gpt2kern ops; write(i, k, v, qkv) stores K/V (views of c_attn's output qkv),
        attend(i, q) returns [B, T, H, D],
        mm(i, j, x, epilogue) is layer i's j-th matmul (c_attn, attn_proj, c_fc, mlp_proj)."""
        B, T, _ = h.shape
        E, H, D = self.E, self.H, self.D
        layers = self.W.layers
        ln = layers[0].ln_1
        x = ops.layer_norm(h, ln.weight, ln.bias, ln.eps)
        for i, L in enumerate(layers):
            qkv = mm(i, 0, x, "none")
            q, k, v = (s.view(B, T, H, D).transpose(1, 2) for s in qkv.split(E, dim=2))
            write(i, k, v, qkv)
            a = mm(i, 1, attend(i, q).view(B, T, E), "none")
            h, x = ops.add_layer_norm(a, h, L.ln_2.weight, L.ln_2.bias, L.ln_2.eps)
            m = mm(i, 3, mm(i, 2, x, "gelu_new"), "none")
            ln = layers[i + 1].ln_1 if i + 1 < len(layers) else self.W.ln_f
            h, x = ops.add_layer_norm(m, h, ln.weight, ln.bias, ln.eps)
        return x

    def _mm_conv1d(self, i, j, x, epilogue):
        L = self.W.layers[i]
        return (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)[j](x, epilogue)

    def _mm_nk(self, i, j, x, epilogue):
        w, b = self._nk[i][j]
        return ops.matmul_nk(x, w, b, epilogue)

    def _gemv(self, lin, x, epilogue="none", **caches):  # gemv 3 or 4 (counters), or a reduced mode's GEMV
        return ops.matmul_decode(x, lin.data, lin.bias, epilogue, None, lin.scales, counters=self._counters, **caches)

    def _mm_decode(self, i, j, x, epilogue):
        L = self.W.layers[i]
        lin = (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)[j]
        if j == 0 and self.kv_write_variant == 3:  # c_attn stores K/V at the slot as it writes them
            return self._gemv(lin, x, k_cache=self.k_cache[i], v_cache=self.v_cache[i], slot=self.slot)
        return self._gemv(lin, x, epilogue)

    def _step_body(self):
        # the new token's slot, kv_len and positions: the cursor advanced by one first
        if self.kv_write_variant == 3:  # inside the embedding kernel
            h = ops.embedding_step(self.ids, self.W.wte, self.W.wpe, self.cursor)
        else:
            self.cursor.add_(1)
            h = ops.embedding(self.ids, self.W.wte, self.W.wpe, self.pos)

        def write(i, k, v, qkv):
            if self.kv_write_variant == 2:  # one kernel writes both, at the slot read on the device
                ops.kv_write(qkv, self.k_cache[i], self.v_cache[i], self.slot)
            # (kv_write=3: c_attn's GEMV stored them, _mm_decode)

        def attend(i, q):  # over slots [0, kv_len) only: kv_len is read on the device
            return ops.decode_attention(q, self.k_cache[i], self.v_cache[i], self.key_mask, self.kv_len,
                                        self.W.layers[i].scale)

        if self.gemv_variant == 2:
            x = self._layers(h, write, attend, self._mm_nk)
            logits = ops.matmul_nk(x, *self._nk_head).view(self.B, self.V)
        elif self.gemv_variant in (3, 4) or self.kv_write_variant == 3:
            x = self._layers(h, write, attend, self._mm_decode)
            logits = self._gemv(self.W.lm_head, x).view(self.B, self.V)
        else:  # gemv None: conv1d's own path
            x = self._layers(h, write, attend, self._mm_conv1d)
            logits = self.W.lm_head(x).view(self.B, self.V)
        return logits

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

            def write(i, k, v, qkv):
                self.k_cache[i, :, :, :T].copy_(k)
                self.v_cache[i, :, :, :T].copy_(v)

            def attend(i, q):
                return ops.attention(q, self.k_cache[i, :, :, :T], self.v_cache[i, :, :, :T], km, None,
                                     self.W.layers[i].scale, 0, True)

            x = self._layers(ops.embedding(ids, self.W.wte, self.W.wpe, pos), write, attend, self._mm_conv1d)
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
