"""GPT-2's blocks, written once in Python: HF's per-op forward (dropin._walk), the CUDA-graph decoder's prefill and its
captured step (cuda_graph.py) all run `blocks`. (The C++ engine, csrc/cpu/engine.cpp, is the only other body.)

    x = blocks(W, h, attend)                                  h: the embedding [B, T, E] -> ln_f's output [B, T, E]
    x = blocks(W, h, attend, matmul=my_matmul, name=watch)

The callers differ only in where K/V go and how attention reads them (`attend`), which kernel runs each matmul
(`matmul`) and who looks at the named steps (`name`: gpt2kern.tracing, output_hidden_states).
"""
from __future__ import annotations

from ..kernels import ops

# a weights.Layer's matmul fields, in the order a block runs them (the `which` of a matmul hook)
MATMULS = ("c_attn", "attn_proj", "c_fc", "mlp_proj")


def _unwatched(step, tensor):
    pass


def blocks(W, h, attend, matmul=None, name=None):
    """The GPT-2 blocks of `W` (weights.Weights) over the embedding h [B, T, E]; returns ln_f's output.

    attend(i, q, k, v, qkv) -> [B, T, H, D]   layer i's attention: q, k, v [B, H, T, D] are views of c_attn's output
                                              qkv [B, T, 3E]; the hook stores K/V where its caller keeps them
    matmul(i, which, x, epilogue)             layer i's matmul `which` (a MATMULS name) with its epilogue ('none' or
                                              'gelu_new'); default: the layer's Linear record (conv1d)
    name(step, tensor)                        each named step's value in execution order: h.{i}.ln_1,
                                              h.{i}.attn.c_attn, h.{i}.attn, h.{i}.ln_2, h.{i}.mlp.act, h.{i}.mlp,
                                              h.{i} per block, then ln_f (steps.step_names; the caller names wte
                                              and wpe before and lm_head after)
    The body reads no tensor's values (no host sync): a CUDA graph can capture it wherever its hooks allow.
    """
    B, T, E = h.shape
    H = W.n_head
    D = E // H
    layers = W.layers
    mm = matmul or (lambda i, which, x, epilogue: getattr(layers[i], which)(x, epilogue))
    name = name or _unwatched
    ln = layers[0].ln_1
    x = ops.layer_norm(h, ln.weight, ln.bias, ln.eps)
    for i, L in enumerate(layers):
        name(f"h.{i}.ln_1", x)
        qkv = mm(i, "c_attn", x, "none")
        name(f"h.{i}.attn.c_attn", qkv)
        q, k, v = (s.view(B, T, H, D).transpose(1, 2) for s in qkv.split(E, dim=2))
        a = mm(i, "attn_proj", attend(i, q, k, v, qkv).view(B, T, E), "none")
        name(f"h.{i}.attn", a)
        h, x = ops.add_layer_norm(a, h, L.ln_2.weight, L.ln_2.bias, L.ln_2.eps)
        name(f"h.{i}.ln_2", x)
        f = mm(i, "c_fc", x, "gelu_new")
        name(f"h.{i}.mlp.act", f)  # c_fc and NewGELU run as one fused kernel
        m = mm(i, "mlp_proj", f, "none")
        name(f"h.{i}.mlp", m)
        ln = layers[i + 1].ln_1 if i + 1 < len(layers) else W.ln_f
        h, x = ops.add_layer_norm(m, h, ln.weight, ln.bias, ln.eps)  # the next block's ln_1, or ln_f
        name(f"h.{i}", h)
    name("ln_f", x)
    return x
