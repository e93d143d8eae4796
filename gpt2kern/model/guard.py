"""May this call run on gpt2kern's kernels — and if not, why? One answer, `why_not`, for every entry point:

    why_not(st, "forward", ...)     the GPT2Model body of an optimized model (any HF GPT-2 class; HF's generate)
    why_not(st, "lm_head", hidden)  the head after a body call: follows the body (HF's lm_head after HF's body)
    why_not(st, "generate", model)  gpt2kern.generate's C++ engine, which runs no module's forward at all
    why_not(st, "cuda_graph", model)  CudaGraphDecoder: the engine's conditions, on CUDA

A reason (a string) means the whole call is handed to HF's own code; None means the kernels serve it. The answer
has two parts. The model's part — module classes, patched forwards, hooks, training mode, config — is worked out
again only when the model changed, which `Snapshot.changed()` notices in ~10 µs per call. The call's part —
autograd, arguments, devices — is looked at on every call. `CASES` lists every case, and the README's "What runs
where" table is generated from it (`python -m gpt2kern.model.guard`; a test keeps the two equal).

Under torch.compile the snapshot is not consulted (dynamo guards the module state it traced); the call's part is
traced like any Python and decided at compile time.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import _C


@dataclasses.dataclass(frozen=True)
class Case:
    when: str  # the case, as the README table shows it
    why: str  # why HF's code runs the call
    entries: str  # which entry points it concerns


CASES = (
    Case("`model.train()`, or any module inside the body left in training mode",
         "dropout and autograd are HF's business", "all"),
    Case("grad enabled and a parameter requires grad (a plain `model(ids)` after `optimize()`, training code)",
         "the kernels have no backward: HF's path gives HF's gradients", "forward, lm_head"),
    Case("`output_attentions=True`", "the flash-style kernel never forms the attention matrix", "forward"),
    Case("`output_hidden_states` given as a list of layers", "HF's business", "forward"),
    Case("`inputs_embeds=` instead of `input_ids`", "the embedding kernel gathers ids", "forward"),
    Case("`encoder_hidden_states=`, `add_cross_attention=True`", "not GPT-2 LM inference", "all"),
    Case("`EncoderDecoderCache`, non-`Cache` caches (legacy tuples)", "not GPT-2 LM inference", "forward"),
    Case("model not float32 on CPU (or on CUDA, when built with CUDA), or inputs on another device",
         "fp32 kernels only (for now)", "all"),
    Case("`activation_function` ≠ `gelu_new`, fewer heads than `n_embd` implies, LayerNorms with different `eps` or "
         "without affine parameters, an embedding with `max_norm`, an `lm_head` that is not a bias-free `Linear`",
         "the kernels would compute something else", "all"),
    Case("a module the kernels stand in for (wte, wpe, drop, ln_*, attn, c_attn, c_proj, c_fc, act, mlp, blocks, "
         "lm_head) that is not HF's own class — a subclass or a wrapper such as a PEFT/LoRA layer — or has its "
         "`forward` patched on the instance or on the class",
         "the kernels would compute the original module, not yours (checked again whenever a module, a public "
         "module attribute or a class's `forward` changes)", "all"),
    Case("forward (pre-)hooks on any module inside the body, or global module hooks",
         "the hooks would never fire; hooks on the `GPT2Model` itself and on `lm_head` wrap the fast forward and "
         "do fire, and transformers' own value-preserving hooks (output capturing, gradient checkpointing's "
         "`make_inputs_require_grads`) do not count", "all"),
    Case("the body of this call ran HF's path", "the head follows the body", "lm_head"),
    Case("forward hooks or a patched `forward` on the model, its `transformer` or its `lm_head`; a model class "
         "that is not HF's `GPT2LMHeadModel` or overrides its `forward`; `lm_head` replaced after `optimize()`",
         "HF's `generate` would run those; the engine runs no module's forward", "generate, cuda_graph"),
)


def markdown_table() -> str:
    rows = ["| case | why | entry points |", "|---|---|---|"]
    rows += [f"| {c.when} | {c.why} | {c.entries} |" for c in CASES]
    return "\n".join(rows)


# ---------------------------------------------------------------- the model's part

def _hf_block():
    from transformers.activations import NewGELUActivation
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block
    from transformers.pytorch_utils import Conv1D

    return [("", GPT2Block), (".ln_1", nn.LayerNorm), (".attn", GPT2Attention), (".attn.c_attn", Conv1D),
            (".attn.c_proj", Conv1D), (".attn.attn_dropout", nn.Dropout), (".attn.resid_dropout", nn.Dropout),
            (".ln_2", nn.LayerNorm), (".mlp", GPT2MLP), (".mlp.c_fc", Conv1D), (".mlp.act", NewGELUActivation),
            (".mlp.c_proj", Conv1D), (".mlp.dropout", nn.Dropout)]


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def config_reason(t, lm_head: nn.Module | None) -> str | None:
    """Why the kernels cannot compute what this model's modules compute (None when they can). Every module the fast
    path stands in for must be HF's own class, exactly, with its forward not patched on the instance or class."""
    cfg = t.config
    if cfg.activation_function != "gelu_new":
        return f"activation_function={cfg.activation_function!r} (kernels implement gelu_new)"
    if getattr(cfg, "add_cross_attention", False):
        return "add_cross_attention=True"
    block = _hf_block()
    hf_classes = {want for _, want in block} | {nn.Embedding, nn.Linear}
    for name, want in [("wte", nn.Embedding), ("wpe", nn.Embedding), ("drop", nn.Dropout), ("ln_f", nn.LayerNorm)] + \
            [(f"h.{i}{leaf}", want) for i in range(len(t.h)) for leaf, want in block]:
        mod = _submodule(t, name)
        if type(mod) is not want:
            return f"{name} is {type(mod).__name__}, not HF's {want.__name__} (the kernels compute the original)"
    for name, mod in list(t.named_modules()) + [("lm_head", lm_head)]:
        if mod is None:
            continue
        if name and name != "lm_head" and "forward" in mod.__dict__:
            return f"{name}.forward is patched on the instance (the kernels would skip it)"
        f = type(mod).forward
        if (f.__module__, f.__qualname__) != (type(mod).__module__, f"{type(mod).__name__}.forward") \
                and type(mod) in hf_classes:
            return f"{type(mod).__name__}.forward is patched on the class (the kernels compute the original)"
    for blk in t.h:
        if blk.attn.c_attn.weight.shape[1] != 3 * cfg.n_embd:
            return "modified attention projections"
        if blk.attn.num_heads * blk.attn.head_dim != cfg.n_embd:
            return "pruned attention heads"
        if any(ln.weight is None or ln.bias is None for ln in (blk.ln_1, blk.ln_2)):
            return "LayerNorm without affine weight and bias"
    if t.ln_f.weight is None or t.ln_f.bias is None:
        return "LayerNorm without affine weight and bias"
    if len({ln.eps for blk in t.h for ln in (blk.ln_1, blk.ln_2)} | {t.ln_f.eps}) > 1:
        return "LayerNorms with different eps (the one-call body takes one)"
    if any(e.max_norm is not None for e in (t.wte, t.wpe)):
        return "embedding with max_norm"
    if lm_head is not None and (type(lm_head) is not nn.Linear or lm_head.bias is not None):
        return f"lm_head is {type(lm_head).__name__}{' with a bias' if type(lm_head) is nn.Linear else ''}, " \
               "not HF's bias-free Linear"
    return None


def bypass_reason(t) -> str | None:
    """What the fast path would silently skip inside the body: forward hooks on its modules (the body's and
    lm_head's own hooks still run, they wrap the forward we replace), global forward hooks (they would see only
    those two modules), or a module left in training mode (its dropout)."""
    if t.training:
        return "training mode"
    g = torch.nn.modules.module
    if any(_user_hook(h) for d in (g._global_forward_hooks, g._global_forward_pre_hooks) for h in list(d.values())):
        return "global forward hooks (torch.nn.modules.module.register_module_forward_hook)"
    for name, mod in t.named_modules():
        if mod.training:
            return f"training mode ({name})"
        if name and has_user_hooks(mod) and not isinstance(mod, nn.ModuleList):
            return f"forward hooks on {name}"
    return None


def has_user_hooks(mod: nn.Module) -> bool:
    """Forward (pre-)hooks other than the value-preserving ones transformers (or PEFT) installs for good: the
    output-capturing hooks (they record only inside HF's own forward; the fast path makes hidden_states itself
    and hands output_attentions to HF) and the make_inputs_require_grads hook of gradient checkpointing."""
    return any(_user_hook(h) for d in (mod._forward_hooks, mod._forward_pre_hooks) for h in list(d.values()))


def _user_hook(h) -> bool:
    module, name = getattr(h, "__module__", None) or "", getattr(h, "__name__", "")
    return not (module.split(".")[0] in ("transformers", "peft")
                and name in ("output_capturing_hook", "make_inputs_require_grads", "make_inputs_require_grad"))


def model_reason(t, lm_head) -> str | None:
    """The model's part of the answer (the same for every call until the model changes)."""
    return config_reason(t, lm_head) or bypass_reason(t)


class Snapshot:
    """What `changed()` compares per call, flat, so the check is a few list comparisons instead of a walk over the
    module tree on every decode step. Every submodule and parameter slot (a replaced module or Parameter), each slot
    dict's size (an added one), the forward-hook dicts' sizes, each module's attribute count and public attributes
    (a hook added, a forward patched on the instance, train()/eval(), eps or scaling reassigned), the forward of each
    module class (patched on the class), and each parameter's storage, version, device and dtype (.to(), in-place
    edits, load_state_dict; read in one C++ call). Take it before looking at the model: a change made while the
    model is read is then seen by the next call."""

    def __init__(self, *roots: nn.Module | None):
        g = torch.nn.modules.module
        sizes = [(g._global_forward_hooks, len(g._global_forward_hooks)),
                 (g._global_forward_pre_hooks, len(g._global_forward_pre_hooks))]
        slots, classes, params = [], {}, []
        for root in roots:
            for m in (root.modules() if root is not None else ()):
                ds = [m._modules, m._parameters, m._forward_hooks, m._forward_pre_hooks, m.__dict__]
                sizes += [(d, len(d)) for d in ds]
                slots += [(d, k, v) for d in ds[:2] for k, v in d.items()]
                slots += [(m.__dict__, k, v) for k, v in m.__dict__.items() if not k.startswith("_")]
                classes[type(m)] = type(m).forward
                params += [p for p in m._parameters.values() if p is not None and all(p is not q for q in params)]
        self.sizes, self.slots, self.classes = sizes, slots, tuple(classes.items())
        self.params = tuple(params)
        self.stamp = _C.stamp(self.params)

    def changed(self) -> bool:
        return not (_C.same_slots(self.sizes, self.slots) and all(c.forward is f for c, f in self.classes)
                    and _C.stamp(self.params) == self.stamp)


# ---------------------------------------------------------------- the one answer

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def why_not(st, entry: str, *, input_ids=None, inputs_embeds=None, cache=None, encoder_hidden_states=None,
            output_attentions=None, output_hidden_states=None, hidden=None, model=None) -> str | None:
    """Why `entry` cannot run this call on the kernels (None when it can). `st` is the model's gpt2kern state
    (dropin.py's State): this brings its packs and its model reason up to date first (outside torch.compile)."""
    if not _compiling():
        st.refresh()
    why = st.model_reason
    if why is not None:
        return why
    if entry == "forward":
        return _forward_reason(st, input_ids, inputs_embeds, cache, encoder_hidden_states, output_attentions,
                               output_hidden_states)
    if entry == "lm_head":
        if not _compiling() and not st.body_was_fast:
            return st.fallback_reason or "the body of this call ran HF's path"
        if st.weights is None or st.weights.lm_head is None:
            return _device_reason(st)
        if _needs_grad(st.params):
            return "autograd (grad enabled and parameters require grad)"
        if hidden.device != st.device or hidden.dtype != torch.float32:
            return f"hidden states {hidden.dtype} on {hidden.device}, model float32 on {st.device}"
        return None
    if entry in ("generate", "cuda_graph"):
        return _engine_reason(st, model, entry)
    raise ValueError(f"unknown entry point {entry!r}")


def _needs_grad(params) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _kernel_devices():
    from ..kernels import ops

    return ("cpu", "cuda") if ops.has_cuda() else ("cpu",)


def _device_reason(st) -> str:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in st.params})
    where = str(st.device) if st.device is not None else "several devices"
    return (f"not a float32 model on {' or '.join(d.upper() for d in _kernel_devices())} (parameters "
            f"{'/'.join(dtypes)} on {where})")


def _forward_reason(st, input_ids, inputs_embeds, cache, encoder_hidden_states, output_attentions,
                    output_hidden_states) -> str | None:
    from transformers.cache_utils import Cache, EncoderDecoderCache

    if _needs_grad(st.params):
        return "autograd (grad enabled and parameters require grad)"
    if output_attentions or (output_attentions is None and st.transformer.config.output_attentions):
        return "output_attentions"
    if output_hidden_states not in (None, False, True):
        return "output_hidden_states selects layers"
    if inputs_embeds is not None or input_ids is None:
        return "inputs_embeds"
    if encoder_hidden_states is not None:
        return "cross-attention"
    if cache is not None and (not isinstance(cache, Cache) or isinstance(cache, EncoderDecoderCache)):
        return f"cache type {type(cache).__name__}"
    if st.weights is None:
        return _device_reason(st)
    if input_ids.device != st.device:
        return f"input_ids on {input_ids.device}, model on {st.device}"
    return None


def _engine_reason(st, model, entry: str) -> str | None:
    """The engine runs no module's forward, so it also defers to HF for what would run in the modules around the
    body: hooks and patched forwards on the model, its transformer and lm_head, an overridden model forward."""
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT2LMHeadModel):
        return f"{type(model).__name__} is not a GPT2LMHeadModel"
    if model.training:
        return "training mode (HF's generate would apply dropout)"
    if st.lm_head is not model.lm_head or st.transformer is not model.transformer:
        return "lm_head was replaced after optimize()"
    for name, m in (("the model", model), ("transformer", model.transformer), ("lm_head", model.lm_head)):
        if has_user_hooks(m):  # HF's generate calls these modules; the engine does not
            return f"forward hooks on {name}"
        f = m.__dict__.get("forward")
        if f is not None and not installed_forward(m, f):
            return f"{name}.forward is patched on the instance"
    f = type(model).forward
    if (f.__module__, f.__qualname__) != (GPT2LMHeadModel.__module__, "GPT2LMHeadModel.forward"):
        return f"{type(model).__name__}.forward is not HF's GPT2LMHeadModel.forward"
    if st.weights is None or st.weights.lm_head is None:
        return _device_reason(st)
    want = "cuda" if entry == "cuda_graph" else None
    if want and st.device.type != want:
        return f"CudaGraphDecoder needs a float32 model on CUDA, got one on {st.device}"
    return None


class InstalledForward:
    """Base of the forward optimize() installs on a module (model/dropin.py): what tells it apart from a forward a
    user patched onto the instance, which the guard must refuse to skip."""

    module = None


def installed_forward(module, f) -> bool:
    """Whether `f` (found in module.__dict__) is the forward optimize() installed there."""
    return isinstance(f, InstalledForward) and f.module is module


if __name__ == "__main__":  # the README's "What runs where" table
    print(markdown_table())
