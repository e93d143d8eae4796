"""The gpt2kern ops: thin Python wrappers over torch.ops.gpt2kern.* (schemas in csrc/ops.cpp), their fake
implementations for torch.compile / meta tensors, and the ISA switch of the CPU kernels. With a CUDA build
(`has_cuda()`), every op also runs on CUDA float32 tensors (csrc/cuda), with the same checks and semantics.

Every op checks its arguments in C++ and raises TypeError (dtype), ValueError (shape/value) or IndexError (id out
of range) naming the argument.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.gpt2kern)

_ops = torch.ops.gpt2kern
# each op's .default overload, looked up once: no overload resolution or namespace lookup per call (at decode
# sizes the glue is most of an op's cost)
_layer_norm, _add_layer_norm, _gelu_new, _pack, _conv1d, _attention, _embedding = (
    getattr(_ops, n).default for n in ("layer_norm", "add_layer_norm", "gelu_new", "pack", "conv1d", "attention",
                                       "embedding"))
_decode_attention, _matmul_nk = _ops.decode_attention.default, _ops.matmul_nk.default  # CUDA only
_matmul_prefill, _kv_write = _ops.matmul_prefill.default, _ops.kv_write.default  # CUDA only
_matmul_decode, _embedding_step = _ops.matmul_decode.default, _ops.embedding_step.default  # CUDA only
GEMV_MAX_ROWS = 32  # matmul_nk's row limit (kGemvMaxRows, csrc/cuda/launch.h)
PANEL = _C.PANEL  # columns per packed weight panel (defined once: csrc/cpu/kernel_table.h's kPanel)
EPILOGUES = ("none", "gelu_new", "residual")

_env_isa = os.environ.get("GPT2KERN_ISA")
if _env_isa and _env_isa != _C.isa():
    warnings.warn(f"GPT2KERN_ISA={_env_isa!r} is not available here; using {_C.isa()!r} "
                  f"(available: {', '.join(_C.supported_isas())})", stacklevel=2)


def isa() -> str:
    """The ISA level the CPU kernels run at: 'avx512', 'avx2' or 'generic'."""
    return _C.isa()


def supported_isas() -> list[str]:
    return list(_C.supported_isas())


def set_isa(name: str) -> None:
    """Force the CPU kernels to one ISA level (tests use this to cover every path)."""
    if name not in ("avx512", "avx2", "generic"):
        raise ValueError(f"isa must be 'avx512', 'avx2' or 'generic', got {name!r}")
    if not _C.set_isa(name):
        raise ValueError(f"this CPU cannot run {name!r}; available: {', '.join(_C.supported_isas())}")


def _int8_dot_mode(on: bool | None) -> str:
    return "auto" if on is None else "on" if on else "off"


def set_int8_dot(on: bool | None) -> None:
    """int8 weights × int8 activations on the CPU (x quantized per row and weight group, integer dot products):
    True for every row count where the CPU has the kernels, False never, None (the default) for prefill where the
    kernels prefill over packed panels (AVX512-VNNI: measured faster, bench/RESULTS.md); GPT2KERN_INT8_DOT=1 / 0
    start it on / off. Process-wide, like set_isa; it changes int8 mode's numbers (README, Weight modes)."""
    _C.set_int8_dot(_int8_dot_mode(on))


@contextlib.contextmanager
def using_int8_dot(on: bool | None = True):
    """set_int8_dot(on) inside the block, the previous setting after it."""
    before = _C.int8_dot_mode()
    _C.set_int8_dot(_int8_dot_mode(on))
    try:
        yield
    finally:
        _C.set_int8_dot(before)


def int8_dot(rows: int = 512) -> bool:
    """Whether a matmul of `rows` rows (default: a prefill) against int8 weights multiplies x quantized to int8 now
    (the switch, this CPU, the ISA level)."""
    return bool(_C.int8_dot(rows))


def int8_dot_kernels() -> str | None:
    """The int8 dot-product kernels this CPU runs: 'avx2' (VPMADDUBSW), 'avxvnni' or 'avx512vnni' (VPDPBUSD), or
    None."""
    return _C.int8_dot_kernels()


def has_cuda() -> bool:
    """Whether the extension was built with its CUDA kernels (then every op also runs on CUDA tensors)."""
    return bool(_C.has_cuda())


def _tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last dim (nn.LayerNorm semantics)."""
    return _layer_norm(_tensor(x, "x"), _tensor(weight, "weight"), _tensor(bias, "bias"), float(eps))


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-5):
    """Returns (x + residual, LayerNorm(x + residual)) computed in one pass over memory."""
    return _add_layer_norm(_tensor(x, "x"), _tensor(residual, "residual"), _tensor(weight, "weight"),
                           _tensor(bias, "bias"), float(eps))


def gelu_new(x):
    """HF's NewGELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return _gelu_new(_tensor(x, "x"))


def pack(weight):
    """A packed fp32 copy of a Conv1D weight [in, out]: on CPU panels [ceil(out/32), in, 32] (conv1d's
    layout='panels'; optimize(pack=True) keeps these); on CUDA a contiguous copy of [in, out] (layout 'kn')."""
    return _pack(_tensor(weight, "weight"))


LAYOUTS = ("kn", "nk", "panels")


def conv1d(x, weight, bias=None, epilogue: str = "none", residual=None, out_features: int = -1,
           layout: str = "kn", scales=None):
    """HF Conv1D: x @ W + bias, followed by the fused epilogue: 'none', 'gelu_new', or 'residual' (adds `residual`).

    The weight's storage (gpt2kern.kernels.weights.WeightFormat): layout 'kn' = HF's [in, out] fp32; 'nk' = [out, in]
    fp32 (an nn.Linear / tied-embedding weight, read without a transposed copy); 'panels' = [ceil(out/32), in, 32]
    packed by pack() or WeightFormat.make, in float32, float16, bfloat16 or int8 (int8 with `scales`
    [panels, in / group, 32]); out_features gives `out` for panels. On CUDA: layout 'kn' only, in float32 or (the
    reduced weight modes' CUDA storage) float16, bfloat16 or int8 with `scales` [in / group, out]."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _conv1d(_tensor(x, "x"), _tensor(weight, "weight"), bias, epilogue, residual, int(out_features), layout,
                   scales)


def attention(q, k, v, key_mask=None, bias=None, scale: float = 1.0, q_offset: int = 0, causal: bool = True):
    """Softmax attention of q [B, H, Tq, D] over k, v [B, H, Tkv, D] -> [B, Tq, H, D].

    causal: query row i sits at position q_offset + i and sees keys j <= q_offset + i.
    key_mask [B, L] bool: False marks padding (keys j >= L are not seen). bias [B|1, H|1, Tq, L] float is added
    to the scores (-inf = masked). Rows that see no key come out as zeros; a NaN among a row's visible scores
    makes that row NaN, as in HF's softmax.
    """
    return _attention(_tensor(q, "q"), _tensor(k, "k"), _tensor(v, "v"), key_mask, bias, float(scale),
                          int(q_offset), bool(causal))


def embedding(input_ids, wte, wpe, position_ids, token_type_ids=None):
    """wte[input_ids] + wpe[position_ids] (+ wte[token_type_ids]), ids range-checked.

    On CPU an id out of range raises IndexError at once. On CUDA the check runs on the device, so a call never
    waits for the GPU: the rows with a bad id come out NaN and the IndexError (naming the id) is raised by the next
    CUDA embedding call after that kernel finished, or by check_cuda_errors() (which synchronizes first)."""
    return _embedding(_tensor(input_ids, "input_ids"), _tensor(wte, "wte"), _tensor(wpe, "wpe"),
                          _tensor(position_ids, "position_ids"), token_type_ids)


def check_cuda_errors(synchronize: bool = True) -> None:
    """Raise the IndexError of a bad id that a CUDA embedding call found on the device (see embedding). With
    synchronize, waits for every GPU first, so every call made so far is checked. No-op without CUDA kernels."""
    if not has_cuda():
        return
    if synchronize and torch.cuda.is_initialized():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
    _C.check_embedding_errors()


def _on_cuda(op, x):
    if not (isinstance(x, torch.Tensor) and x.device.type == "cuda"):
        dev = x.device if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"gpt2kern.{op} runs on CUDA tensors only (a CUDA-only op), got {dev}")
    if not has_cuda():
        raise RuntimeError(f"gpt2kern.{op}: gpt2kern was built without its CUDA kernels")
    return x


def decode_attention(q, k, v, key_mask, kv_len, scale: float):
    """CUDA decode attention over a static cache: q [B, H, Tq, D] against the first kv_len[b] keys of k, v
    [B, H, Tmax, D] (kv_len int64 [1] or [B] on the GPU, read there: capturable in a CUDA graph, and the work grows
    with kv_len, not Tmax), key_mask [B, L] bool as in attention; no causal limit inside the Tq rows. -> [B, Tq, H, D].
    Flash-decoding (keys split over blocks) where it applies: Tq = 1, D % 4 == 0, 16-byte aligned key rows; the
    general attention kernel (one block per row and head) otherwise."""
    return _decode_attention(_on_cuda("decode_attention", q), _tensor(k, "k"), _tensor(v, "v"), key_mask,
                             _tensor(kv_len, "kv_len"), float(scale))


def matmul_nk(x, weight, bias=None, epilogue: str = "none", residual=None, scales=None):
    """CUDA decode GEMV, variant 2 (CudaGraphDecoder gemv=2): epilogue(x @ weight.T + bias) with weight [out, in]
    (nn.Linear's layout), x of at most GEMV_MAX_ROWS rows; one warp per output column, no split-K. weight float32
    (float4 loads), or a reduced weight mode's [out, in] copy (WeightFormat 'nk'): float16, bfloat16, or int8 with
    its float32 scales [out, in / group] (w = q * scales[n, k // group]), read 16 bytes per lane and load."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    return _matmul_nk(_on_cuda("matmul_nk", x), _tensor(weight, "weight"), bias, epilogue, residual, scales)


def matmul_prefill(x, weight, bias=None, epilogue: str = "none", residual=None, splits: int = 0):
    """CUDA: conv1d's fp32 prefill GEMM at any number of rows, epilogue(x @ weight + bias) with weight [in, out]
    (HF's Conv1D layout): 128x128 tiles with deterministic split-K when there are fewer tiles than SMs, the variant
    cuda_variant('prefill_gemm') names (2 fp32 FMAs, 3 3xTF32 tensor cores). splits 0: conv1d's own count (bitwise
    conv1d for more than GEMV_MAX_ROWS rows); 1 to 64 forces it."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    return _matmul_prefill(_on_cuda("matmul_prefill", x), _tensor(weight, "weight"), bias, epilogue, residual,
                           int(splits))


def kv_write(qkv, k_cache, v_cache, slot) -> None:
    """CUDA: write one token's K and V per row from c_attn's output qkv [B, 3E] (or [B, 1, 3E]) into slot `slot`
    (int64 [1] on the GPU, read there: capturable) of k_cache, v_cache [B, H, Tmax, D], in one kernel. A slot
    outside [0, Tmax) writes nothing."""
    _kv_write(_on_cuda("kv_write", qkv), _tensor(k_cache, "k_cache"), _tensor(v_cache, "v_cache"),
              _tensor(slot, "slot"))


def matmul_decode(x, weight, bias=None, epilogue: str = "none", residual=None, scales=None, k_cache=None,
                  v_cache=None, slot=None, counters=None):
    """CUDA decode GEMV, the CUDA-graph decoder's: epilogue(x @ weight + bias) with weight [in, out] in any CUDA
    weight mode, x of at most GEMV_MAX_ROWS rows. float32 weights: x staged in shared memory (decoder gemv=3),
    bitwise conv1d's result; with `counters` (int32 zeros on the GPU, at least ceil(out / 32); every call leaves them
    zero; one GEMV at a time may use them) the last block per 32 columns sums the split-K partials, so no finish
    kernel is launched (gemv=4), still bitwise conv1d's. float16, bfloat16, or int8 weights with their scales
    [in / group, out]: conv1d's GEMV, their only one (no counters).
    With k_cache, v_cache [B, H, Tmax, D] and slot (int64 [1] on the GPU, read there: capturable), the GEMV also
    stores each row's K and V (columns [E, 2E) and [2E, 3E) of c_attn's output, E = H*D) at that slot of its cache
    as it writes them: the K/V write folded into c_attn (CudaGraphDecoder kv_write=3). A slot outside [0, Tmax)
    stores nothing."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    return _matmul_decode(_on_cuda("matmul_decode", x), _tensor(weight, "weight"), bias, epilogue, residual, scales,
                          k_cache, v_cache, slot, counters)


def embedding_step(input_ids, wte, wpe, cursor):
    """CUDA decode-step embedding that advances the decoder's cursor (int64 [2 + B] on the GPU: slot, kv_len, then each
    row's position) in the same kernel: row b of input_ids [B, 1] is embedded at position cursor[2 + b] + 1, which
    is stored back, and slot and kv_len grow by one. -> [B, 1, n_embd]. Ids are checked on the GPU as embedding's."""
    return _embedding_step(_on_cuda("embedding_step", input_ids), _tensor(wte, "wte"), _tensor(wpe, "wpe"),
                           _tensor(cursor, "cursor"))


def capture_node_counts() -> dict:
    """The nodes captured so far into the CUDA graph the current stream is capturing, by type (kernel, memcpy,
    memset, other, total): call it last inside `with torch.cuda.graph(g):` to count what one replay launches.
    ValueError outside a capture."""
    if not has_cuda():
        raise RuntimeError("gpt2kern was built without its CUDA kernels")
    return dict(_C.capture_node_counts())


CUDA_VARIANTS = ("prefill_gemm", "prefill_attention")  # the prefill kernels whose numbered variant can be chosen


def cuda_variant(name: str, value: int = 0) -> int:
    """The numbered variant that the CUDA prefill kernel `name` runs in this process: 'prefill_gemm' (conv1d's and
    matmul_prefill's GEMM for more than GEMV_MAX_ROWS rows) or 'prefill_attention' (attention: 1 the general kernel,
    2 FlashAttention-2 in fp32 where it applies — head dim 32 or 64, no bias, >= 16 query rows, aligned rows — and 1
    elsewhere). value > 0 sets it first (ValueError for a variant that does not exist). The defaults: the
    compiled-in ones (the measured winners), replaced by this GPU's from gpt2kern/decode/cuda_variants.json when
    gpt2kern first packs weights on a CUDA GPU (kernels/cuda_table.py; a variant set here before or after is kept).
    The GPU bench switches them to time each variant end to end."""
    if not has_cuda():
        raise RuntimeError("gpt2kern was built without its CUDA kernels")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"value must be an int, got {type(value).__name__}")
    got = int(_C.cuda_variant(name, value))
    if value > 0:
        _chosen.add(name)  # the caller's choice: the measured per-GPU defaults (cuda_table.py) leave it
    return got


_chosen: set = set()  # the CUDA_VARIANTS names set through cuda_variant in this process


def chosen_cuda_variants() -> frozenset:
    """The names whose variant was set through cuda_variant in this process (the per-GPU defaults keep those)."""
    return frozenset(_chosen)


def forget_chosen_cuda_variant(name: str) -> None:
    """Count `name`'s current variant as a default again (cuda_table.py, after setting a measured default)."""
    _chosen.discard(name)


def set_cuda_pdl(on: bool) -> bool:
    """Programmatic dependent launch for gpt2kern's CUDA kernels launched from now on (process-wide; needs an sm_90+
    GPU, ValueError otherwise): each kernel may start while the previous one in its stream runs — its blocks
    resident, the decode GEMVs' weights prefetched into L2 — and waits on the device until that one's writes are
    visible before touching its inputs. Results are bitwise the same either way. It applies to launches on created
    streams (a CUDA graph's capture, torch.cuda.Stream()); the default stream keeps plain launches. Returns the
    previous setting. CudaGraphDecoder(launch=2) turns it on around its step."""
    if not has_cuda():
        raise RuntimeError("gpt2kern was built without its CUDA kernels")
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {type(on).__name__}")
    return bool(_C.set_cuda_pdl(on))


@contextlib.contextmanager
def using_cuda_variant(name: str, value: int):
    """cuda_variant(name, value) inside the block; after it the previous variant, and whether it was the caller's
    choice (chosen_cuda_variants), restored."""
    before, was_chosen = cuda_variant(name), name in _chosen
    cuda_variant(name, value)
    try:
        yield
    finally:
        cuda_variant(name, before)
        if not was_chosen:
            _chosen.discard(name)


@contextlib.contextmanager
def cuda_pdl(on: bool = True):
    """set_cuda_pdl(on) inside the block, the previous setting restored after it."""
    before = set_cuda_pdl(on)
    try:
        yield
    finally:
        set_cuda_pdl(before)


# ---- fake implementations: shapes and dtypes only, for meta tensors and torch.compile ----

@torch.library.register_fake("gpt2kern::layer_norm")
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("gpt2kern::add_layer_norm")
def _(x, residual, weight, bias, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("gpt2kern::gelu_new")
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("gpt2kern::pack")
def _(weight):
    k, n = weight.shape
    if weight.device.type == "cuda":
        return weight.new_empty((k, n))
    return weight.new_empty(((n + PANEL - 1) // PANEL, k, PANEL))


@torch.library.register_fake("gpt2kern::conv1d")
def _(x, weight, bias, epilogue="none", residual=None, out_features=-1, layout="kn", scales=None):
    # N as the C++ op reads it (cpu/matmul.cpp: weight_out_features): the layout's shape, or out_features
    if out_features >= 0:
        n = out_features
    elif layout in ("kn", "nk") and weight.dim() == 2:
        n = weight.shape[1] if layout == "kn" else weight.shape[0]
    else:  # the same error as the real op
        raise ValueError("gpt2kern.conv1d: a weight in layout 'panels' needs out_features to give N")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("gpt2kern::attention")
def _(q, k, v, key_mask, bias, scale, q_offset, causal):
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d))


@torch.library.register_fake("gpt2kern::embedding")
def _(input_ids, wte, wpe, position_ids, token_type_ids):
    return wte.new_empty((*input_ids.shape, wte.shape[1]))


@torch.library.register_fake("gpt2kern::decode_attention")
def _(q, k, v, key_mask, kv_len, scale):
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d))


@torch.library.register_fake("gpt2kern::matmul_nk")
def _(x, weight, bias=None, epilogue="none", residual=None, scales=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("gpt2kern::matmul_prefill")
def _(x, weight, bias=None, epilogue="none", residual=None, splits=0):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@torch.library.register_fake("gpt2kern::matmul_decode")
def _(x, weight, bias=None, epilogue="none", residual=None, scales=None, k_cache=None, v_cache=None, slot=None,
      counters=None):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@torch.library.register_fake("gpt2kern::embedding_step")
def _(input_ids, wte, wpe, cursor):
    return wte.new_empty((input_ids.shape[0], 1, wte.shape[1]))


@torch.library.register_fake("gpt2kern::kv_write")
def _(qkv, k_cache, v_cache, slot):
    return None
