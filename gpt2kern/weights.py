"""The weights as the kernels read them, one record per block with named fields, built once per (re)pack.

    Linear(weight, bias, n_in, n_out)     one Conv1D (or the tied lm_head): on CPU the weight packed into
                                          [ceil(n_out / PANEL), n_in, PANEL] panels (ops.pack), on CUDA HF's own
                                          contiguous [n_in, n_out] tensor
    Norm(weight, bias, eps)               one LayerNorm
    Layer(ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj, scale)
    Weights(layers, wte, wpe, ln_f, lm_head, n_head)      the whole body (+ the head tied to wte), from pack()

The per-op walk (model.py), the C++ engine (`Layer.to_c()`: _C.LayerWeights, keyword arguments only) and the CUDA
graph decoder all read these records. Each record checks its shapes when it is built, so a field handed the wrong
tensor fails here, by name, instead of computing wrong numbers later.
"""
from __future__ import annotations

import dataclasses

import torch

from . import ops


@dataclasses.dataclass(frozen=True)
class Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    n_in: int
    n_out: int

    def __post_init__(self):
        w = self.weight
        if w.device.type == "cpu" and w.dim() == 3:
            want = ((self.n_out + ops.PANEL - 1) // ops.PANEL, self.n_in, ops.PANEL)
        else:
            want = (self.n_in, self.n_out)
        if tuple(w.shape) != want or w.dtype != torch.float32 or not w.is_contiguous():
            raise ValueError(f"Linear weight must be a contiguous float32 {list(want)} for {self.n_in} -> "
                             f"{self.n_out}, got {w.dtype} {list(w.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.n_out,):
            raise ValueError(f"Linear bias must be [{self.n_out}], got {list(self.bias.shape)}")

    @classmethod
    def of(cls, weight_in_out: torch.Tensor, bias: torch.Tensor | None, packed: bool = True) -> "Linear":
        """From an [in, out] weight (HF Conv1D's layout): packed on CPU when `packed`, else HF's own tensor read in
        place (contiguous); on CUDA the contiguous tensor as is."""
        w = weight_in_out.detach()
        w = w.contiguous() if (w.is_cuda or not packed) else ops.pack(w)
        return cls(w, None if bias is None else bias.detach(), weight_in_out.shape[0], weight_in_out.shape[1])

    def __call__(self, x, epilogue: str = "none"):
        return ops.conv1d(x, self.weight, self.bias, epilogue, out_features=self.n_out)


@dataclasses.dataclass(frozen=True)
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def of(cls, ln: torch.nn.LayerNorm) -> "Norm":
        return cls(ln.weight.detach(), ln.bias.detach(), float(ln.eps))


@dataclasses.dataclass(frozen=True)
class Layer:
    ln_1: Norm
    c_attn: Linear
    attn_proj: Linear
    ln_2: Norm
    c_fc: Linear
    mlp_proj: Linear
    scale: float

    def __post_init__(self):
        E = self.ln_1.weight.numel()
        F = self.c_fc.n_out
        for name, lin, n_in, n_out in (("c_attn", self.c_attn, E, 3 * E), ("attn_proj", self.attn_proj, E, E),
                                       ("c_fc", self.c_fc, E, F), ("mlp_proj", self.mlp_proj, F, E)):
            if (lin.n_in, lin.n_out) != (n_in, n_out) or lin.bias is None:
                raise ValueError(f"Layer.{name} must be a {n_in} -> {n_out} Linear with a bias, got "
                                 f"{lin.n_in} -> {lin.n_out}")
        for name, n in (("ln_1", self.ln_1), ("ln_2", self.ln_2)):
            if n.weight.shape != (E,) or n.bias.shape != (E,):
                raise ValueError(f"Layer.{name} must hold [{E}] weight and bias, got {list(n.weight.shape)}, "
                                 f"{list(n.bias.shape)}")

    @classmethod
    def of(cls, blk, scale: float, packed: bool = True) -> "Layer":
        a, m = blk.attn, blk.mlp
        lin = lambda c: Linear.of(c.weight, c.bias, packed)  # noqa: E731
        return cls(ln_1=Norm.of(blk.ln_1), c_attn=lin(a.c_attn), attn_proj=lin(a.c_proj), ln_2=Norm.of(blk.ln_2),
                   c_fc=lin(m.c_fc), mlp_proj=lin(m.c_proj), scale=float(scale))

    def to_c(self):
        """The same record for csrc/cpu/engine.cpp (CPU packs only)."""
        from . import _C

        c = lambda t: t.contiguous()  # noqa: E731
        return _C.LayerWeights(
            ln_1_weight=c(self.ln_1.weight), ln_1_bias=c(self.ln_1.bias),
            c_attn_weight=self.c_attn.weight, c_attn_bias=c(self.c_attn.bias),
            attn_proj_weight=self.attn_proj.weight, attn_proj_bias=c(self.attn_proj.bias),
            ln_2_weight=c(self.ln_2.weight), ln_2_bias=c(self.ln_2.bias),
            c_fc_weight=self.c_fc.weight, c_fc_bias=c(self.c_fc.bias),
            mlp_proj_weight=self.mlp_proj.weight, mlp_proj_bias=c(self.mlp_proj.bias), scale=self.scale)


@dataclasses.dataclass(frozen=True)
class Weights:
    layers: tuple[Layer, ...]
    wte: torch.Tensor
    wpe: torch.Tensor
    ln_f: Norm
    lm_head: Linear | None  # x @ wteᵀ (HF's lm_head.weight transposed, packed), None for a body without the head
    n_head: int

    @property
    def eps(self) -> float:
        """The one LayerNorm eps the C++ body takes (the guard refuses models whose LayerNorms differ)."""
        return self.ln_f.eps

    def body(self):
        """_C.Body over these packs: the whole body in one C++ call (CPU)."""
        from . import _C

        return _C.Body([L.to_c() for L in self.layers], self.wte, self.wpe, self.ln_f.weight, self.ln_f.bias,
                       self.n_head, self.eps)

    def engine(self, batch: int, max_len: int, max_rows: int):
        """_C.Engine (gpt2kern.generate's decoder) over these packs, with its KV cache for batch × max_len."""
        from . import _C

        if self.lm_head is None:
            raise ValueError("the decode engine needs the model's lm_head")
        return _C.Engine([L.to_c() for L in self.layers], self.wte, self.wpe, self.ln_f.weight, self.ln_f.bias,
                         self.lm_head.weight, self.lm_head.n_out, self.n_head, self.eps, batch, max_len, max_rows)


def attn_scale(cfg, attn) -> float:
    """The attention scale HF's module applies (its `scaling` attribute; older transformers: from the config)."""
    if hasattr(attn, "scaling"):
        return float(attn.scaling)
    s = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return s / float(attn.layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else s


@torch.no_grad()
def pack(transformer, lm_head, packed: bool = True) -> Weights:
    """The GPT2Model body (and lm_head, tied or not) as the kernels read it. packed=False: the blocks' matmuls read
    HF's own [in, out] weights in place (no second copy of them); the lm_head is packed either way."""
    layers = tuple(Layer.of(blk, attn_scale(transformer.config, blk.attn), packed) for blk in transformer.h)
    head = None
    if lm_head is not None:
        head = Linear.of(lm_head.weight.t(), None)  # [E, V]: packed on CPU, one contiguous copy on CUDA
    return Weights(layers=layers, wte=transformer.wte.weight.detach(), wpe=transformer.wpe.weight.detach(),
                   ln_f=Norm.of(transformer.ln_f), lm_head=head, n_head=transformer.config.n_head)
