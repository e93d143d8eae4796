"""The weights as the kernels read them, one record per block with named fields, built once per (re)pack.

    WeightFormat(layout, dtype, n_in, n_out, group)   how one matmul weight is stored: HF's own fp32 tensor read
                                          in place ('kn' [in, out] / 'nk' [out, in]) or packed panels in fp32,
                                          fp16, bf16 or int8 (+ scales); on CUDA 'kn' in any of the four dtypes, and
                                          'nk' ones for the decode GEMV variant 2 (nk_copy);
                                          the op, engine, fakes and bench read it
    Linear(data, scales, bias, fmt)       one Conv1D (or the lm_head) in its format; on CUDA [in, out] ('kn')
    Norm(weight, bias, eps)               one LayerNorm
    Layer(ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj, scale)
    Weights(layers, wte, wpe, ln_f, lm_head, n_head, mode)   the whole body (+ the head), from pack()

The per-op body (model/body.py), the C++ engine (`Weights.to_c()`: _C.Model of _C.Layer, _C.Linear and _C.Norm, keyword
arguments only) and the CUDA graph decoder all read these records. Each record checks its shapes when it is built,
so a field handed the wrong tensor fails here, by name, instead of computing wrong numbers later.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import ops

# weight modes: the stored element type of every matmul weight (activations and accumulation stay fp32)
MODES = ("fp32", "fp16", "bf16", "int8")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
LAYOUTS = ("panels", "kn", "nk")
# int8: consecutive k that share one scale (per output column). 64 keeps most of group 32's accuracy for fewer
# bytes, and one outlier weight spoils only its own group, not a column (bench/RESULTS.md, "int8 group size").
INT8_GROUP = 64


def int8_group(n_in: int) -> int:
    """The int8 group for a weight with n_in inputs: INT8_GROUP, or the largest divisor of n_in below it."""
    return next(g for g in range(min(INT8_GROUP, n_in), 0, -1) if n_in % g == 0)


def check_mode(weights: str) -> str:
    if weights not in MODES:
        raise ValueError(f"weights must be one of {', '.join(repr(m) for m in MODES)}, got {weights!r}")
    return weights


def _div127(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127 rounded once to float32 on every device: torch on CUDA divides by a scalar as a multiplication by
    its reciprocal (off by an ulp at times), so the quotient is taken in float64, where that cannot change it."""
    return (amax.double() / 127.0).float()


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How one matmul weight (n_in -> n_out) is stored — the one description the matmul op, the C++ engine, the
    fakes and the bench's byte count read (csrc/cpu/kernel_table.h's Layout and WType):

        layout 'panels'  [ceil(n_out / PANEL), n_in, PANEL] in the mode's dtype, made by optimize() (CPU)
               'kn'      [n_in, n_out]: fp32 is HF Conv1D's own weight, read in place (CPU and CUDA); fp16, bf16
                         and int8 are the CUDA storage of the reduced modes (a copy in that orientation, which the
                         CUDA kernels read: the CPU kernels read 'kn' in fp32 only and refuse the others by name)
               'nk'      [n_out, n_in]: fp32 is an nn.Linear-style weight read in place (the lm_head over the tied
                         wte; CPU); in every dtype the CUDA decode GEMV variant 2's copies (ops.matmul_nk,
                         CudaGraphDecoder gemv=2: nk_copy), which the CPU kernels refuse but in fp32, by name
        dtype  'fp32' | 'fp16' | 'bf16' | 'int8'; int8 is symmetric with fp32 scales, one per `group` consecutive
               inputs and output column: [panels, n_in / group, PANEL] for 'panels', [n_in / group, n_out] for 'kn',
               [n_out, n_in / group] for 'nk' (a row's groups contiguous, as its weights)
    """
    layout: str
    dtype: str
    n_in: int
    n_out: int
    group: int = 0  # int8: consecutive k per scale

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        check_mode(self.dtype)
        if self.dtype == "int8" and not (self.group >= 1 and self.n_in % self.group == 0):
            raise ValueError(f"int8 group must divide n_in={self.n_in}, got {self.group}")

    @property
    def panels(self) -> int:
        return (self.n_out + ops.PANEL - 1) // ops.PANEL

    @property
    def data_shape(self) -> tuple:
        return {"panels": (self.panels, self.n_in, ops.PANEL), "kn": (self.n_in, self.n_out),
                "nk": (self.n_out, self.n_in)}[self.layout]

    @property
    def scales_shape(self) -> tuple | None:
        if self.dtype != "int8":
            return None
        if self.layout == "kn":
            return (self.n_in // self.group, self.n_out)
        if self.layout == "nk":
            return (self.n_out, self.n_in // self.group)
        return (self.panels, self.n_in // self.group, ops.PANEL)

    @property
    def nbytes(self) -> int:
        """Bytes a pass over the weight reads (what a decode step streams), scales included."""
        n = math.prod(self.data_shape) * _DTYPES[self.dtype].itemsize
        return n + (math.prod(self.scales_shape) * 4 if self.scales_shape else 0)

    def make(self, w_in_out: torch.Tensor):
        """(data, scales) in this format from an [n_in, n_out] float32 weight (a view is fine), on the weight's
        device. fp16/bf16 round to nearest even; int8 is symmetric: scale = max|w| / 127 per group and column,
        q = round(w / scale). fp32 'kn' / 'nk' are the weight itself (a view); fp16 / bf16 / int8 'nk' hold the
        values of 'kn' transposed (nk_copy)."""
        w = w_in_out.detach()
        if self.layout == "kn" and self.dtype == "fp32":
            return w, None
        if self.layout == "nk" and self.dtype == "fp32":
            return w.t(), None
        if self.layout == "nk":
            kn = dataclasses.replace(self, layout="kn")
            return kn.nk_copy(*kn.make(w))[1:]
        if not torch.isfinite(w).all():
            raise ValueError(f"cannot store a {self.n_in} -> {self.n_out} weight as {self.dtype}: it holds NaN or "
                             f"inf values")
        if self.layout == "kn":
            return self._make_kn(w)
        # panel by panel in chunks, into the final tensors: the temporaries stay a few MiB even for the lm_head
        data = torch.empty(self.data_shape, dtype=_DTYPES[self.dtype])
        scales = torch.empty(self.scales_shape, dtype=torch.float32) if self.dtype == "int8" else None
        step = 64  # panels per chunk
        for p0 in range(0, self.panels, step):
            p1 = min(self.panels, p0 + step)
            n0, n1 = p0 * ops.PANEL, min(self.n_out, p1 * ops.PANEL)
            wp = torch.nn.functional.pad(w[:, n0:n1].float(), (0, (p1 - p0) * ops.PANEL - (n1 - n0)))  # [K, cols]
            if self.dtype == "int8":
                g = wp.view(self.n_in // self.group, self.group, -1)
                amax = g.abs().amax(dim=1)  # [K / G, cols]
                sc = torch.where(amax > 0, _div127(amax), torch.ones_like(amax))
                wp = torch.round(g / sc[:, None, :]).clamp_(-127, 127).to(torch.int8).view(self.n_in, -1)
                scales[p0:p1] = sc.view(-1, p1 - p0, ops.PANEL).transpose(0, 1)
            data[p0:p1] = wp.to(data.dtype).view(self.n_in, p1 - p0, ops.PANEL).transpose(0, 1)
        return data, scales

    def _make_kn(self, w: torch.Tensor):
        """fp16 / bf16 / int8 in layout 'kn' (the CUDA storage): [n_in, n_out] in the dtype, int8 scales
        [n_in / group, n_out]; the same rounding as the panels (element for element), in column chunks."""
        data = torch.empty(self.data_shape, dtype=_DTYPES[self.dtype], device=w.device)
        scales = (torch.empty(self.scales_shape, dtype=torch.float32, device=w.device) if self.dtype == "int8"
                  else None)
        step = 8192  # columns per chunk: temporaries of a few tens of MiB at most
        for n0 in range(0, self.n_out, step):
            n1 = min(self.n_out, n0 + step)
            wc = w[:, n0:n1].float()
            if self.dtype == "int8":
                g = wc.reshape(self.n_in // self.group, self.group, n1 - n0)
                amax = g.abs().amax(dim=1)  # [K / G, cols]
                sc = torch.where(amax > 0, _div127(amax), torch.ones_like(amax))
                data[:, n0:n1] = torch.round(g / sc[:, None, :]).clamp_(-127, 127).to(torch.int8).view(self.n_in, -1)
                scales[:, n0:n1] = sc
            else:
                data[:, n0:n1] = wc.to(data.dtype)
        return data, scales

    def nk_copy(self, data: torch.Tensor, scales: torch.Tensor | None):
        """(format, data, scales) of the same stored values in layout 'nk' ([n_out, n_in], int8 scales
        [n_out, n_in / group], both contiguous, on data's device): what ops.matmul_nk reads (the decode GEMV
        variant 2). From 'kn' a transposed copy (the same q and scales: no rounding again); 'nk' as it is, made
        contiguous where it is not."""
        if self.layout == "panels":
            raise ValueError("nk_copy reads layout 'kn' or 'nk', got 'panels' (the CPU packs)")
        fmt = dataclasses.replace(self, layout="nk")
        if self.layout == "nk":
            return fmt, data.contiguous(), None if scales is None else scales.contiguous()
        return fmt, data.t().contiguous(), None if scales is None else scales.t().contiguous()

    def unpack(self, data: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """The [n_in, n_out] float64 weight this storage represents (tests' reference: exact, from the stored
        values)."""
        if self.layout == "kn":
            w = data.double()
            if scales is not None:
                w = w * scales.double().repeat_interleave(self.group, dim=0)
            return w
        if self.layout == "nk":
            w = data.double()
            if scales is not None:
                w = w * scales.double().repeat_interleave(self.group, dim=1)
            return w.t()
        w = data.double()
        if scales is not None:
            w = w * scales.double().repeat_interleave(self.group, dim=1)
        return w.transpose(0, 1).reshape(self.n_in, -1)[:, :self.n_out]


@dataclasses.dataclass(frozen=True)
class Linear:
    """One matmul weight in its WeightFormat, with its bias."""
    data: torch.Tensor
    scales: torch.Tensor | None
    bias: torch.Tensor | None
    fmt: WeightFormat

    def __post_init__(self):
        f, w = self.fmt, self.data
        want_dtype = _DTYPES[f.dtype]
        if tuple(w.shape) != f.data_shape or w.dtype != want_dtype or (f.layout == "panels" and not w.is_contiguous()):
            raise ValueError(f"Linear weight must be a {want_dtype} {list(f.data_shape)} ({f.layout}) for {f.n_in} -> "
                             f"{f.n_out}, got {w.dtype} {list(w.shape)}")
        if f.scales_shape != (None if self.scales is None else tuple(self.scales.shape)):
            raise ValueError(f"Linear scales must be {f.scales_shape}, got "
                             f"{None if self.scales is None else list(self.scales.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (f.n_out,):
            raise ValueError(f"Linear bias must be [{f.n_out}], got {list(self.bias.shape)}")

    n_in = property(lambda self: self.fmt.n_in)
    n_out = property(lambda self: self.fmt.n_out)

    @classmethod
    def of(cls, weight_in_out: torch.Tensor, bias: torch.Tensor | None, mode: str = "fp32", packed: bool = False,
           layout: str | None = None) -> "Linear":
        """From an [in, out] weight (HF Conv1D's layout). fp32: HF's tensor read in place ('kn'; 'nk' where the
        caller passes the transpose of an [out, in] tensor), or a packed copy when `packed`; other modes: packed in
        that dtype. On CUDA, always layout 'kn': fp32 the contiguous [in, out] tensor, other modes an [in, out] copy
        in that dtype (int8: + scales [in / group, out]) on the same GPU (`packed` and `layout` do not apply)."""
        w = weight_in_out.detach()
        n_in, n_out = w.shape
        if w.is_cuda:
            fmt = WeightFormat("kn", mode, n_in, n_out, int8_group(n_in) if mode == "int8" else 0)
            data, scales = fmt.make(w.contiguous() if mode == "fp32" else w)
            return cls(data, scales, None if bias is None else bias.detach(), fmt)
        if mode != "fp32" or packed:
            layout = "panels"
        layout = layout or "kn"
        fmt = WeightFormat(layout, mode, n_in, n_out, int8_group(n_in) if mode == "int8" else 0)
        if layout == "kn" and not (w.stride(1) == 1 and (n_in <= 1 or w.stride(0) >= n_out)):
            w = w.contiguous()  # rows must be contiguous to be read in place
        if layout == "nk" and not (w.stride(0) == 1 and (n_out <= 1 or w.stride(1) >= n_in)):
            w = w.t().contiguous().t()
        data, scales = fmt.make(w)
        return cls(data, scales, None if bias is None else bias.detach(), fmt)

    def __call__(self, x, epilogue: str = "none", residual=None):
        return ops.conv1d(x, self.data, self.bias, epilogue, residual, out_features=self.n_out,
                          layout=self.fmt.layout, scales=self.scales)

    def to_c(self, name: str = ""):
        """The same record for csrc/cpu/engine.cpp (CPU formats), checked there against its format once; `name`
        labels its errors."""
        from .. import _C

        f = self.fmt
        return _C.Linear(data=self.data, scales=self.scales,
                         bias=None if self.bias is None else self.bias.contiguous(), layout=f.layout, dtype=f.dtype,
                         n_in=f.n_in, n_out=f.n_out, group=f.group, name=name)


@dataclasses.dataclass(frozen=True)
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def of(cls, ln: torch.nn.LayerNorm) -> "Norm":
        return cls(ln.weight.detach(), ln.bias.detach(), float(ln.eps))

    def to_c(self):
        from .. import _C

        return _C.Norm(weight=self.weight.contiguous(), bias=self.bias.contiguous(), eps=self.eps)


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
    def of(cls, blk, scale: float, mode: str = "fp32", packed: bool = False) -> "Layer":
        a, m = blk.attn, blk.mlp
        lin = lambda c: Linear.of(c.weight, c.bias, mode, packed)  # noqa: E731
        return cls(ln_1=Norm.of(blk.ln_1), c_attn=lin(a.c_attn), attn_proj=lin(a.c_proj), ln_2=Norm.of(blk.ln_2),
                   c_fc=lin(m.c_fc), mlp_proj=lin(m.c_proj), scale=float(scale))

    def to_c(self):
        """The same record for csrc/cpu/engine.cpp (CPU packs only)."""
        from .. import _C

        return _C.Layer(ln_1=self.ln_1.to_c(), c_attn=self.c_attn.to_c("c_attn"),
                        attn_proj=self.attn_proj.to_c("attn.c_proj"), ln_2=self.ln_2.to_c(),
                        c_fc=self.c_fc.to_c("c_fc"), mlp_proj=self.mlp_proj.to_c("mlp.c_proj"), scale=self.scale)


@dataclasses.dataclass(frozen=True)
class Weights:
    layers: tuple[Layer, ...]
    wte: torch.Tensor
    wpe: torch.Tensor
    ln_f: Norm
    lm_head: Linear | None  # x @ wteᵀ (over HF's lm_head.weight in place, or packed), None for a body without the head
    n_head: int
    mode: str = "fp32"

    @property
    def added_bytes(self) -> int:
        """Bytes of weight copies these records hold beside HF's parameters (0 in fp32 read in place)."""
        lins = [lin for L in self.layers for lin in (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)]
        return sum(lin.fmt.nbytes for lin in lins + ([self.lm_head] if self.lm_head is not None else [])
                   if lin.fmt.layout == "panels")

    @property
    def nbytes(self) -> int:
        """Bytes of matmul weights one decode step streams (the lm_head included)."""
        lins = [lin for L in self.layers for lin in (L.c_attn, L.attn_proj, L.c_fc, L.mlp_proj)]
        return sum(lin.fmt.nbytes for lin in lins + ([self.lm_head] if self.lm_head is not None else []))

    def to_c(self):
        """The same record for csrc/cpu/engine.cpp (_C.Model, CPU packs only): what _C.Body and _C.Engine take."""
        from .. import _C

        return _C.Model(layers=[L.to_c() for L in self.layers], wte=self.wte, wpe=self.wpe, ln_f=self.ln_f.to_c(),
                        lm_head=None if self.lm_head is None else self.lm_head.to_c("lm_head"), n_head=self.n_head)

    def body(self):
        """_C.Body over these packs: the whole body in one C++ call (CPU)."""
        from .. import _C

        return _C.Body(self.to_c())

    def engine(self, batch: int, max_len: int, max_rows: int):
        """_C.Engine (gpt2kern.generate's decoder) over these packs, with its KV cache for batch × max_len."""
        from .. import _C

        if self.lm_head is None:
            raise ValueError("the decode engine needs the model's lm_head")
        return _C.Engine(self.to_c(), batch, max_len, max_rows)


def attn_scale(cfg, attn) -> float:
    """The attention scale HF's module applies (its `scaling` attribute; older transformers: from the config)."""
    if hasattr(attn, "scaling"):
        return float(attn.scaling)
    s = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return s / float(attn.layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else s


@torch.no_grad()
def pack(transformer, lm_head, packed: bool = False, mode: str = "fp32") -> Weights:
    """The GPT2Model body (and lm_head, tied or not) as the kernels read it. fp32: HF's own weights read in place
    (the blocks' [in, out] Conv1D weights and the lm_head's [vocab, n_embd]), no second copy, unless `packed`
    (a panel copy of each, the opt-in for the last few percent of prefill speed); other modes: a packed copy in
    that dtype (the lm_head's from the tied wte too; the embedding gather stays fp32)."""
    check_mode(mode)
    layers = tuple(Layer.of(blk, attn_scale(transformer.config, blk.attn), mode, packed) for blk in transformer.h)
    head = None
    if lm_head is not None:
        head = Linear.of(lm_head.weight.t(), None, mode, packed, layout="nk")  # [E, V] seen as the transpose of [V, E]
    return Weights(layers=layers, wte=transformer.wte.weight.detach(), wpe=transformer.wpe.weight.detach(),
                   ln_f=Norm.of(transformer.ln_f), lm_head=head, n_head=transformer.config.n_head, mode=mode)
