"""The named steps of GPT-2's forward, from the fast path and from HF's own modules, side by side.

    step_names(config)        wte, wpe, h.0.ln_1, h.0.attn.c_attn, h.0.attn, h.0.ln_2, h.0.mlp.act, h.0.mlp, h.0,
                              ..., ln_f, lm_head — the fast path's execution order
    hf_steps(model, ids)      HF's output of the module with each of those names (forward hooks), before optimize()
    fast_steps(model, ids)    the optimized forward's value at each step (gpt2kern.tracing)
    compare(hf, fast)         per step: shape, max |Δ|, max |ref|, tolerance, ok

What each step runs on the fast path is in `describe(name)`; that is where a learner reads that c_fc and the
activation run as one kernel and that dropout is the identity in eval mode.
"""
from __future__ import annotations

import re

import torch

from .dropin import tracing

BLOCK_STEPS = ["ln_1", "attn.c_attn", "attn", "ln_2", "mlp.act", "mlp"]
# per-step tolerance vs HF eager fp32: |Δ| <= ATOL + RTOL·max|ref| (same budget as tests/test_model_parity.py)
ATOL, RTOL = 1e-4, 1e-5

# what each step runs on the fast path: (short, for the trace table; long, for --layer)
_WHAT = {
    "wte": ("wte[ids]", "token embedding wte[ids] (gathered in one kernel with wpe and their sum)"),
    "wpe": ("wpe[positions]", "position embedding wpe[positions]: one row per prompt position"),
    "ln_1": ("layer_norm", "LayerNorm ln_1 (block 0: layer_norm; later blocks: fused into the previous "
             "block's add_layer_norm)"),
    "attn.c_attn": ("conv1d -> q|k|v", "conv1d c_attn: x·W + b, split into q | k | v (K/V then go through "
                    "HF's Cache.update)"),
    "attn": ("attention, conv1d c_proj", "attention softmax(q·kᵀ·scale + causal mask)·v, then conv1d c_proj; "
             "attn and resid dropout are the identity in eval mode"),
    "ln_2": ("add_layer_norm", "add_layer_norm: h = h + attn, then LayerNorm ln_2, in one kernel"),
    "mlp.act": ("conv1d c_fc + gelu_new", "conv1d c_fc with gelu_new fused into its epilogue: c_fc's own "
                "output is never stored, so c_fc -> act run as one kernel"),
    "mlp": ("conv1d c_proj", "conv1d c_proj (then dropout: the identity in eval mode)"),
    "block": ("h + mlp", "h = h + mlp, the block's output (add_layer_norm also computes the next ln_1 / ln_f)"),
    "ln_f": ("layer_norm (fused)", "final LayerNorm ln_f (computed by the last block's add_layer_norm)"),
    "lm_head": ("conv1d x·wteᵀ", "conv1d lm_head: x·wteᵀ (weights tied to wte) -> logits, not probabilities"),
}

def step_names(config) -> list[str]:
    names = ["wte", "wpe"]
    for i in range(config.n_layer):
        names += [f"h.{i}.{s}" for s in BLOCK_STEPS] + [f"h.{i}"]
    return names + ["ln_f", "lm_head"]


def describe(name: str, short: bool = False) -> str:
    """What the fast path runs for this step (short: a few words for a table column)."""
    key = "block" if re.fullmatch(r"h\.\d+", name) else (name.split(".", 2)[-1] if name.startswith("h.") else name)
    what = _WHAT.get(key, ("", ""))
    return what[0] if short else what[1]


def canonical_layer(name: str, config) -> str:
    """A --layer argument -> the step name; ValueError naming the valid steps for anything else.

    Accepts HF's module names too: transformer.h.0.ln_1, h.0.attn.c_proj (= h.0.attn: dropout is the identity),
    h.0.mlp.c_proj (= h.0.mlp)."""
    names = step_names(config)
    n = name.strip().removeprefix("transformer.")
    n = re.sub(r"^(h\.\d+)\.(attn|mlp)\.(c_proj|dropout|resid_dropout)$", r"\1.\2", n)
    if n in names:
        return n
    m = re.fullmatch(r"h\.(\d+)\.mlp\.c_fc", n)
    if m and int(m.group(1)) < config.n_layer:
        raise ValueError(f"{name!r} runs fused with the activation and its output is never stored; "
                         f"use h.{m.group(1)}.mlp.act (gelu_new(c_fc(x)))")
    m = re.fullmatch(r"h\.(\d+)(\..*)?", n)
    if m and int(m.group(1)) >= config.n_layer:
        raise ValueError(f"unknown layer {name!r}: the model has {config.n_layer} blocks, "
                         f"h.0 .. h.{config.n_layer - 1}")
    raise ValueError(f"unknown layer {name!r}; steps are wte, wpe, h.N.{{{', '.join(BLOCK_STEPS)}}}, h.N, ln_f, "
                     f"lm_head with N in 0..{config.n_layer - 1}")


@torch.no_grad()
def hf_steps(model, ids, **kw) -> dict[str, torch.Tensor]:
    """HF's output of each named module for one forward of `model` (which must not be optimized now)."""
    from .dropin import is_optimized

    if is_optimized(model):
        raise ValueError("hf_steps needs HF's own forward: call it before gpt2kern.optimize or after restore")
    wanted = set(step_names(model.config))
    rec, hooks = {}, []
    for full, mod in model.named_modules():
        short = full.removeprefix("transformer.")
        if short in wanted:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, short=short: rec.__setitem__(short, (o[0] if isinstance(o, tuple) else o)
                                                             .detach().clone())))
    try:
        model(ids, use_cache=False, **kw)
    finally:
        for h in hooks:
            h.remove()
    return rec


@torch.no_grad()
def fast_steps(model, ids, **kw) -> list[tuple[str, torch.Tensor]]:
    """The optimized forward's named steps in execution order; ValueError if the call fell back to HF."""
    from .dropin import fallback_reason

    with tracing(model) as steps:
        model(ids, use_cache=False, **kw)
    why = fallback_reason(model)
    if why is not None:
        raise ValueError(f"the fast path did not run this forward (HF's forward ran instead: {why})")
    return steps


def compare(hf: dict[str, torch.Tensor], fast: list[tuple[str, torch.Tensor]]) -> list[dict]:
    """One row per fast step: name, shape, max |Δ| vs HF's module output, max |ref|, tolerance, ok."""
    rows = []
    for name, t in fast:
        ref = hf.get(name)
        row = dict(name=name, shape=list(t.shape), max_abs_diff=None, max_abs_ref=None, tol=None, ok=None)
        if ref is not None and ref.shape == t.shape:
            d = (t.double() - ref.double()).abs().max().item() if t.numel() else 0.0
            mref = ref.abs().max().item() if ref.numel() else 0.0
            tol = ATOL + RTOL * mref
            row.update(max_abs_diff=d, max_abs_ref=mref, tol=tol, ok=bool(d <= tol))
        elif ref is not None:
            row.update(ok=False, note=f"HF shape {list(ref.shape)}")
        rows.append(row)
    return rows
