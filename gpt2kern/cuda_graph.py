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
generate: position ids = cumsum(mask) - 1. Logits come back in a static buffer that the next step overwrites
(clone it to keep it). Weights are read from the model's modules at construction (lm_head packed once): build the
decoder after the weights are final. use_graph=False runs the same step eagerly (for comparison and debugging).
"""
from __future__ import annotations

import torch

from . import ops


def _scaling(model, blk) -> float:
    cfg = model.config
    if hasattr(blk.attn, "scaling"):
        return float(blk.attn.scaling)
    s = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return s / float(blk.attn.layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else s


class CudaGraphDecoder:
    def __init__(self, model, batch_size: int, max_len: int, use_graph: bool = True, warmup: int = 2):
        if not ops.has_cuda():
            raise RuntimeError("gpt2kern was built without its CUDA kernels")
        t = model.transformer
        cfg = model.config
        dev = t.wte.weight.device
        if dev.type != "cuda" or t.wte.weight.dtype != torch.float32:
            raise ValueError(f"CudaGraphDecoder needs a float32 model on CUDA, got {t.wte.weight.dtype} on {dev}")
        if cfg.activation_function != "gelu_new" or getattr(cfg, "add_cross_attention", False):
            raise ValueError("CudaGraphDecoder supports GPT-2 with gelu_new and no cross-attention")
        if not 1 <= max_len <= cfg.n_positions:
            raise ValueError(f"max_len must be in [1, n_positions={cfg.n_positions}], got {max_len}")
        self.model, self.device = model, dev
        self.B, self.Tmax = int(batch_size), int(max_len)
        self.E, self.H = cfg.n_embd, cfg.n_head
        self.D = self.E // self.H
        self.V = model.lm_head.weight.shape[0]
        with torch.no_grad():
            self.wte, self.wpe = t.wte.weight.detach(), t.wpe.weight.detach()
            self.layers = []
            for blk in t.h:
                a, m = blk.attn, blk.mlp
                self.layers.append(dict(
                    ln_1=(blk.ln_1.weight.detach(), blk.ln_1.bias.detach(), blk.ln_1.eps),
                    ln_2=(blk.ln_2.weight.detach(), blk.ln_2.bias.detach(), blk.ln_2.eps),
                    c_attn=(a.c_attn.weight.detach(), a.c_attn.bias.detach()),
                    attn_proj=(a.c_proj.weight.detach(), a.c_proj.bias.detach()),
                    c_fc=(m.c_fc.weight.detach(), m.c_fc.bias.detach()),
                    mlp_proj=(m.c_proj.weight.detach(), m.c_proj.bias.detach()),
                    scale=_scaling(model, blk)))
            lf = t.ln_f
            self.ln_f = (lf.weight.detach(), lf.bias.detach(), lf.eps)
            self.lm_w = ops.pack(model.lm_head.weight.detach().t())  # [E, V] contiguous, once
        L, B, H, D = len(self.layers), self.B, self.H, self.D
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
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):  # allocator and lazy init off the capture
                    self._step_body()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.logits = self._step_body()
        self.reset()

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
        w, b, eps = self.layers[0]["ln_1"]
        x = ops.layer_norm(h, w, b, eps)
        for i, L in enumerate(self.layers):
            qkv = ops.conv1d(x, *L["c_attn"])
            q, k, v = (s.view(B, T, H, D).transpose(1, 2) for s in qkv.split(E, dim=2))
            write(i, k, v)
            a = ops.conv1d(attend(i, q).view(B, T, E), *L["attn_proj"])
            w, b, eps = L["ln_2"]
            h, x = ops.add_layer_norm(a, h, w, b, eps)
            f = ops.conv1d(x, *L["c_fc"], "gelu_new")
            m = ops.conv1d(f, *L["mlp_proj"])
            w, b, eps = self.layers[i + 1]["ln_1"] if i + 1 < len(self.layers) else self.ln_f
            h, x = ops.add_layer_norm(m, h, w, b, eps)
        return x

    def _step_body(self):
        self.key_mask.logical_or_(self.iota.eq(self.slot))  # mark the new slot (elementwise: capturable)
        h = ops.embedding(self.ids, self.wte, self.wpe, self.pos)

        def write(i, k, v):
            self.k_cache[i].index_copy_(2, self.slot, k)
            self.v_cache[i].index_copy_(2, self.slot, v)

        def attend(i, q):
            return ops.attention(q, self.k_cache[i], self.v_cache[i], self.key_mask, None,
                                 self.layers[i]["scale"], 0, False)

        x = self._layers(h, write, attend)
        logits = ops.conv1d(x, self.lm_w, None).view(self.B, self.V)
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
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # as HF generate
        self.key_mask[:, :T] = mask
        km = None if attention_mask is None else self.key_mask[:, :T]

        def write(i, k, v):
            self.k_cache[i, :, :, :T].copy_(k)
            self.v_cache[i, :, :, :T].copy_(v)

        def attend(i, q):
            return ops.attention(q, self.k_cache[i, :, :, :T], self.v_cache[i, :, :, :T], km, None,
                                 self.layers[i]["scale"], 0, True)

        x = self._layers(ops.embedding(ids, self.wte, self.wpe, pos), write, attend)
        logits = ops.conv1d(x[:, -1:], self.lm_w, None).view(B, self.V)
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
