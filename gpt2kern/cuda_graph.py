"""CUDA decode engine: GPT-2's decode step on gpt2kern's CUDA ops, captured once in a CUDA graph and replayed.

    from gpt2kern.cuda_graph import CudaGraphDecoder
    model = GPT2LMHeadModel(...).cuda().eval()            # float32; gpt2kern.optimize() is not needed
    dec = CudaGraphDecoder(model, batch_size=B, max_len=T + n)   # allocates the static cache, captures the graph
    tokens = dec.generate(ids, max_new_tokens=n, attention_mask=mask)   # greedy, [B, T + n], same as HF greedy
    # or step by step (no host sync anywhere in the loop):
    logits = dec.prefill(ids, attention_mask=mask)        # [B, V] logits of each row's last position
    for _ in range(n):
        logits = dec.step(logits.argmax(-1))              # [B, V]: one CUDA graph replay

State, all preallocated in __init__ on the model's device (static shapes: batch_size and max_len are fixed):
  k_cache, v_cache  [n_layer, B, H, max_len, D]  slot j of row b holds that row's j-th token (prompt included)
  key_mask          [B, max_len] bool             True for written, non-padding slots
  ids, pos, slot    [B, 1], [B, 1], [1] int64     next token, its position id, the cache slot it is written to
A step (the captured graph) writes the new token's K/V into `slot` (index_copy_, as HF's StaticCache), marks it in
key_mask, and attends over the whole cache with key_mask hiding padding and unwritten slots (causal=False: for one
query row causality is exactly "slots written so far"); then advances pos and slot on the device. prefill() runs the prompt eagerly with
the same ops (causal attention over slots [0, T)), resets the state and fills slots [0, T). Left padding follows HF
generate (generate.hf_position_ids). Logits come back in a static buffer that the next step overwrites (clone it to
keep it). Weights are the layer records of weights.py (the optimized model's packs, or a private pack), taken at
construction, after guard.why_not(..., "cuda_graph") agreed to stand in for the model (hooks, wrappers such as LoRA
and patched forwards are refused): build the decoder after the weights are final. use_graph=False runs the same step eagerly (for comparison and debugging).
"""
from __future__ import annotations

import torch

from . import guard, ops
from .generate import hf_position_ids
from .model import state_of


class CudaGraphDecoder:
    def __init__(self, model, batch_size: int, max_len: int, use_graph: bool = True, warmup: int = 2):
        if not ops.has_cuda():
            raise RuntimeError("gpt2kern was built without its CUDA kernels")
        st = state_of(model)  # the optimized model's packs, or a private pack (the model untouched)
        why = guard.why_not(st, "cuda_graph", model=model)
        if why is not None:
            raise ValueError(f"CudaGraphDecoder cannot stand in for this model's forward: {why}")
        cfg = model.config
        if not 1 <= max_len <= cfg.n_positions:
            raise ValueError(f"max_len must be in [1, n_positions={cfg.n_positions}], got {max_len}")
        W = st.weights  # weights.Weights: the same layer records the CPU walk and engine read
        self.model, self.device, self.W = model, st.device, W
        self.B, self.Tmax = int(batch_size), int(max_len)
        self.E, self.H = cfg.n_embd, W.n_head
        self.D = self.E // self.H
        self.V = W.lm_head.n_out
        dev = self.device
        L, B, H, D = len(W.layers), self.B, self.H, self.D
        self.k_cache = torch.zeros(L, B, H, self.Tmax, D, device=dev)
        self.v_cache = torch.zeros(L, B, H, self.Tmax, D, device=dev)
        self.key_mask = torch.zeros(B, self.Tmax, dtype=torch.bool, device=dev)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.iota = torch.arange(self.Tmax, device=dev)
        self.length = 0  # slots written (host-side count: no sync needed to know it)
        self.graph = None
        self.logits = None
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

    def reset(self):
        """Forget the sequence: empty cache (key_mask all False), position and slot 0."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.key_mask.zero_()
        self.pos.zero_()
        self.slot.zero_()
        self.length = 0

    # ------------------------------------------------------------ the body, shared by prefill and step

    def _layers(self, h, write, attend):
        """The GPT-2 blocks on gpt2kern ops; write(i, k, v) stores K/V, attend(i, q) returns [B, T, H, D]."""
        B, T, _ = h.shape
        E, H, D = self.E, self.H, self.D
        layers = self.W.layers
        ln = layers[0].ln_1
        x = ops.layer_norm(h, ln.weight, ln.bias, ln.eps)
        for i, L in enumerate(layers):
            qkv = L.c_attn(x)
            q, k, v = (s.view(B, T, H, D).transpose(1, 2) for s in qkv.split(E, dim=2))
            write(i, k, v)
            a = L.attn_proj(attend(i, q).view(B, T, E))
            h, x = ops.add_layer_norm(a, h, L.ln_2.weight, L.ln_2.bias, L.ln_2.eps)
            m = L.mlp_proj(L.c_fc(x, "gelu_new"))
            ln = layers[i + 1].ln_1 if i + 1 < len(layers) else self.W.ln_f
            h, x = ops.add_layer_norm(m, h, ln.weight, ln.bias, ln.eps)
        return x

    def _step_body(self):
        self.key_mask.logical_or_(self.iota.eq(self.slot))  # mark the new slot (elementwise: capturable)
        h = ops.embedding(self.ids, self.W.wte, self.W.wpe, self.pos)

        def write(i, k, v):
            self.k_cache[i].index_copy_(2, self.slot, k)
            self.v_cache[i].index_copy_(2, self.slot, v)

        def attend(i, q):
            return ops.attention(q, self.k_cache[i], self.v_cache[i], self.key_mask, None,
                                 self.W.layers[i].scale, 0, False)

        x = self._layers(h, write, attend)
        logits = self.W.lm_head(x).view(self.B, self.V)
        self.pos.add_(1)
        self.slot.add_(1)
        return logits

    # ------------------------------------------------------------ public

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """Run the prompt [B, T] (left-padded if attention_mask has zeros); returns [B, V] last-position logits."""
        B, T = input_ids.shape
        if B != self.B or not 1 <= T < self.Tmax:
            raise ValueError(f"input_ids must be [{self.B}, T] with 1 <= T < max_len={self.Tmax}, "
                             f"got {tuple(input_ids.shape)}")
        ids = input_ids.to(self.device)
        mask = (torch.ones(B, T, dtype=torch.bool, device=self.device) if attention_mask is None
                else attention_mask.to(self.device) != 0)
        self.reset()
        pos = hf_position_ids(mask)
        self.key_mask[:, :T] = mask
        km = None if attention_mask is None else self.key_mask[:, :T]

        def write(i, k, v):
            self.k_cache[i, :, :, :T].copy_(k)
            self.v_cache[i, :, :, :T].copy_(v)

        def attend(i, q):
            return ops.attention(q, self.k_cache[i, :, :, :T], self.v_cache[i, :, :, :T], km, None,
                                 self.W.layers[i].scale, 0, True)

        x = self._layers(ops.embedding(ids, self.W.wte, self.W.wpe, pos), write, attend)
        logits = self.W.lm_head(x[:, -1:]).view(B, self.V)
        self.pos.copy_(pos[:, -1:] + 1)
        self.slot.fill_(T)
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
        if self.graph is None:
            return self._step_body()
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, attention_mask=None):
        """Greedy decoding: [B, T + max_new_tokens] token ids (no early stop at EOS)."""
        logits = self.prefill(input_ids, attention_mask)
        out = [input_ids.to(self.device)]
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        return torch.cat(out, 1)
