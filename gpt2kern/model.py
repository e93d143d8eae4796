"""optimize(model): GPT-2's forward on gpt2kern's kernels, installed in place on a Hugging Face model.

The walk (`_walk`) reads like the model itself:

    h = wte[ids] + wpe[pos]                                   embedding
    x = ln_1(h)                                               layer_norm
    for each block:  qkv = c_attn(x)                          conv1d
                     k, v = cache.update(k, v)                HF's Cache API (dynamic, static, beams...)
                     a = c_proj(softmax(q·kᵀ·scale + mask)·v)  attention, conv1d
                     h, x = h + a, ln_2(h + a)                add_layer_norm
                     m = c_proj(gelu_new(c_fc(x)))            conv1d with the gelu epilogue fused, conv1d
                     h, x = h + m, next_ln(h + m)             add_layer_norm (next block's ln_1, or ln_f)
    logits = x @ wteᵀ                                         conv1d (lm_head)

HF's decode steps (and calls without a cache) run the same walk in one C++ call instead (`_one_call`: no Python per
layer). HF's GPT2LMHeadModel.forward stays in charge (signature, logits_to_keep, loss, output types); only the
GPT2Model body and lm_head run here. Each call first asks `_why_fallback`: when the kernels cannot serve it
(autograd, training, output_attentions, inputs_embeds, cross-attention, a device without kernels or a dtype other
than float32, an unsupported config, a module that is not HF's own — a LoRA wrapper, say — or forward hooks the fast
path would skip) the whole call runs HF's own code instead — the single decision point.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import types
import weakref

import torch
from torch import nn
from transformers import GPT2LMHeadModel, GPT2Model
from transformers.activations import NewGELUActivation
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block
from transformers.pytorch_utils import Conv1D

from . import _C, ops

# transformers renamed past_key_values -> cache (5.2x); speak whichever this version speaks.
_CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"
_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPastAndCrossAttentions)}
                else "past_key_values")


class _State:
    """Packed weights of one model and what is needed to notice they went stale.

    Threads may share one optimized model: repacking is serialized by a lock and published whole (the stamp last),
    and what a call did (fallback_reason, body_was_fast) is kept per thread, so one thread's fallback never sends
    another thread's lm_head down the wrong path."""

    def __init__(self, transformer: GPT2Model, lm_head: nn.Module | None):
        self._lock = threading.Lock()
        self._local = threading.local()
        self.transformer, self.lm_head = transformer, lm_head
        cfg = transformer.config
        self.unsupported: str | None = None  # set by refresh(): _unsupported_config
        self.bypassed: str | None = None  # set by refresh(): _bypassed
        self._pack_key = None  # what the packs were made from: (stamp, unsupported, _baked_in)
        self.trace = None  # callable(name, tensor) while tracing
        self.body_was_fast = False
        self.fallback_reason: str | None = None
        self.E, self.H = cfg.n_embd, cfg.n_head
        self.stamp = None
        self._watch = None  # see _watch_list
        # cache layer -> weak references to the key/value views the body last returned for it (see _walk); kept
        # here, not on HF's layer objects, so caches still pickle and deepcopy as before
        self._grown = weakref.WeakKeyDictionary()
        self.device = None  # where the packed weights live (CPU, or CUDA when the CUDA kernels are built)
        self.layers: list[dict] = []
        self.lm_w = self.ln_f = None
        self.body = None  # _C.Body over the same packs (CPU): a decode step in one C++ call

    # per thread: what this thread's last forward call did
    fallback_reason = property(lambda self: getattr(self._local, "fallback_reason", None),
                               lambda self, v: setattr(self._local, "fallback_reason", v))
    body_was_fast = property(lambda self: getattr(self._local, "body_was_fast", False),
                             lambda self, v: setattr(self._local, "body_was_fast", v))

    def __getstate__(self):  # copy.deepcopy / pickle of an optimized model: a fresh lock and per-thread state
        d = dict(self.__dict__)
        del d["_lock"], d["_local"]
        d.update(_watch=None, body=None, stamp=None, _grown=None, _pack_key=None)  # repacked on first call
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock, self._local, self._grown = threading.Lock(), threading.local(), weakref.WeakKeyDictionary()

    @property
    def params(self):
        """Read live, so a Parameter replaced after optimize() is noticed too (lm_head is tied to wte, or not)."""
        ps = list(self.transformer.parameters())
        if self.lm_head is not None:
            ps += [p for p in self.lm_head.parameters() if all(p is not q for q in ps)]
        return ps

    def _stamp(self):
        return tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self.params)

    def _watch_list(self):
        """What _fresh checks per call, flat, so the check costs ~10 µs instead of a module-tree walk (~0.2 ms,
        2 % of a decode step): every submodule and parameter slot (a replaced module or Parameter), each slot
        dict's size (an added one), the forward-hook dicts' sizes, each module's attribute count and public
        attributes (a hook added, a forward patched on the instance, train()/eval(), eps or scaling reassigned),
        the forward of each module class (patched on the class), and each parameter's storage, version, device and
        dtype (.to(), in-place edits, load_state_dict; read in one C++ call)."""
        g = torch.nn.modules.module
        slots, sizes = [], [(g._global_forward_hooks, len(g._global_forward_hooks)),
                            (g._global_forward_pre_hooks, len(g._global_forward_pre_hooks))]
        classes = {}
        for root in (self.transformer, self.lm_head):
            for m in (root.modules() if root is not None else ()):
                ds = [m._modules, m._parameters, m._forward_hooks, m._forward_pre_hooks, m.__dict__]
                sizes += [(d, len(d)) for d in ds]
                slots += [(d, k, v) for d in ds[:2] for k, v in d.items()]
                slots += [(m.__dict__, k, v) for k, v in m.__dict__.items() if not k.startswith("_")]
                classes[type(m)] = type(m).forward
        params = self.params
        return sizes, slots, tuple(classes.items()), params, _C.stamp(params)

    @property
    def packed_params(self):
        """The parameters the current packs were made from (after refresh(): the live ones), without a tree walk."""
        return self._watch[3]

    def _fresh(self) -> bool:
        w = self._watch
        if w is None:
            return False
        sizes, slots, classes, params, stamp = w
        return (_C.same_slots(sizes, slots) and all(c.forward is f for c, f in classes)
                and _C.stamp(params) == stamp)

    def refresh(self):
        """(Re)pack the weights if they changed since the last pack (load_state_dict, in-place edits, .to(),
        replaced Parameters or modules, another eps or scaling), and look again at what the kernels can serve
        (module classes, hooks, training mode)."""
        if self._fresh():
            return
        with self._lock:  # one thread packs; the others wait for it, then find the stamp fresh
            watch = self._watch_list()  # first: a change made while this runs is seen by the next call
            unsupported = _unsupported_config(self.transformer, self.lm_head)
            key = (self._stamp(), unsupported, None if unsupported else _baked_in(self.transformer))
            if key != self._pack_key:
                self.unsupported = unsupported
                self._repack(key[0])
                self._pack_key = key
            self.bypassed = _bypassed(self.transformer)
            self._watch = watch

    def _repack(self, stamp):
        devs = {dev for _, _, dev, _ in stamp}
        self.device = devs.pop() if len(devs) == 1 else None
        if (self.unsupported or self.device is None or self.device.type not in _kernel_devices()
                or any(dt != torch.float32 for _, _, _, dt in stamp)):
            self.layers, self.lm_w, self.body, self.stamp = [], None, None, stamp
            return
        with torch.no_grad():
            layers = []
            for blk in self.transformer.h:
                a, m = blk.attn, blk.mlp
                layers.append(dict(
                    ln_1=(blk.ln_1.weight.detach(), blk.ln_1.bias.detach(), blk.ln_1.eps),
                    ln_2=(blk.ln_2.weight.detach(), blk.ln_2.bias.detach(), blk.ln_2.eps),
                    c_attn=_packed(a.c_attn), attn_proj=_packed(a.c_proj),
                    c_fc=_packed(m.c_fc), mlp_proj=_packed(m.c_proj),
                    scale=_attn_scale(self.transformer.config, a),
                ))
            lf = self.transformer.ln_f
            ln_f = (lf.weight.detach(), lf.bias.detach(), lf.eps)
            lm_w = None
            if self.lm_head is not None:
                lm_w = (ops.pack(self.lm_head.weight.detach().t()), self.lm_head.weight.shape[0])
            body = _C.Body(*stack_args(self.transformer, layers, ln_f)) if self.device.type == "cpu" else None
        # published whole, the stamp last: a thread that finds the stamp fresh finds the packs complete
        self.layers, self.ln_f, self.lm_w, self.body = layers, ln_f, lm_w, body
        self.stamp = stamp


def stack_args(transformer, layers, ln_f):
    """The packed weights in the order csrc/cpu/engine.cpp's Stack takes them (for _C.Body and _C.Engine)."""
    weights, scales = [], []
    for L in layers:
        (w1, b1, _), (w2, b2, _) = L["ln_1"], L["ln_2"]
        weights += [w1, b1, L["c_attn"][0], L["c_attn"][1], L["attn_proj"][0], L["attn_proj"][1], w2, b2,
                    L["c_fc"][0], L["c_fc"][1], L["mlp_proj"][0], L["mlp_proj"][1]]
        scales.append(L["scale"])
    lnf_w, lnf_b, eps = ln_f
    return ([w.contiguous() for w in weights], scales, transformer.wte.weight.detach(), transformer.wpe.weight.detach(),
            lnf_w, lnf_b, transformer.config.n_head, eps)


def _kernel_devices():
    return ("cpu", "cuda") if ops.has_cuda() else ("cpu",)


def _packed(conv):
    w = conv.weight.detach()  # on CUDA the kernels read HF's contiguous [in, out] as is: no copy
    return (w if w.is_cuda and w.is_contiguous() else ops.pack(w)), conv.bias.detach(), conv.weight.shape[1]


def _scaling(cfg, layer_idx):
    s = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return s / float(layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else s


# what each module inside a block must be, exactly
_HF_BLOCK = [("", GPT2Block), (".ln_1", nn.LayerNorm), (".attn", GPT2Attention), (".attn.c_attn", Conv1D),
             (".attn.c_proj", Conv1D), (".attn.attn_dropout", nn.Dropout), (".attn.resid_dropout", nn.Dropout),
             (".ln_2", nn.LayerNorm), (".mlp", GPT2MLP), (".mlp.c_fc", Conv1D), (".mlp.act", NewGELUActivation),
             (".mlp.c_proj", Conv1D), (".mlp.dropout", nn.Dropout)]


_HF_CLASSES = {want for _, want in _HF_BLOCK} | {nn.Embedding, nn.Linear}


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _unsupported_config(t: GPT2Model, lm_head: nn.Module | None) -> str | None:
    """Why the kernels cannot compute what this model's modules compute (None when they can). Every module the fast
    path stands in for must be HF's own class, exactly (a subclass or a wrapper, e.g. a LoRA layer, computes
    something else), with its forward not patched on the instance."""
    cfg = t.config
    if cfg.activation_function != "gelu_new":
        return f"activation_function={cfg.activation_function!r} (kernels implement gelu_new)"
    if getattr(cfg, "add_cross_attention", False):
        return "add_cross_attention=True"
    for name, want in [("wte", nn.Embedding), ("wpe", nn.Embedding), ("drop", nn.Dropout), ("ln_f", nn.LayerNorm)] + \
            [(f"h.{i}{leaf}", want) for i in range(len(t.h)) for leaf, want in _HF_BLOCK]:
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
                and type(mod) in _HF_CLASSES:
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


def _baked_in(t: GPT2Model):
    """The numbers the packs hold besides the weights: each LayerNorm's eps and each layer's attention scale."""
    return tuple((blk.ln_1.eps, blk.ln_2.eps, _attn_scale(t.config, blk.attn)) for blk in t.h) + (t.ln_f.eps,)


def _attn_scale(cfg, attn) -> float:
    return float(getattr(attn, "scaling", _scaling(cfg, attn.layer_idx)))


def _bypassed(t: GPT2Model) -> str | None:
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


# ---------------------------------------------------------------- the forward

def _why_fallback(st: _State, input_ids, inputs_embeds, cache, encoder_hidden_states, output_attentions,
                  output_hidden_states) -> str | None:
    t = st.transformer
    if st.unsupported:
        return st.unsupported
    if st.bypassed:  # (training mode among them: refresh() re-reads it after train()/eval())
        return st.bypassed
    if torch.is_grad_enabled() and any(p.requires_grad for p in st.packed_params):
        return "autograd (grad enabled and parameters require grad)"
    if output_attentions or (output_attentions is None and t.config.output_attentions):
        return "output_attentions"
    if output_hidden_states not in (None, False, True):
        return "output_hidden_states selects layers"
    if inputs_embeds is not None or input_ids is None:
        return "inputs_embeds"
    if encoder_hidden_states is not None:
        return "cross-attention"
    if cache is not None and (not isinstance(cache, Cache) or isinstance(cache, EncoderDecoderCache)):
        return f"cache type {type(cache).__name__}"
    if not st.layers:
        return f"not a float32 model on {' or '.join(d.upper() for d in _kernel_devices())}"
    if input_ids.device != st.device:
        return f"input_ids on {input_ids.device}, model on {st.device}"
    return None


def _gpt2model_forward(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None,
                       position_ids=None, inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                       use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                       past_key_values=None, **kwargs):
    st: _State = self._gpt2kern
    if cache is None:
        cache = past_key_values
    st.refresh()
    why = _why_fallback(st, input_ids, inputs_embeds, cache, encoder_hidden_states, output_attentions,
                        output_hidden_states)
    st.fallback_reason, st.body_was_fast = why, why is None
    if why is not None:
        args = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=position_ids, inputs_embeds=inputs_embeds,
                    encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                    use_cache=use_cache, **kwargs)
        args[_CACHE_ARG] = cache
        for k, v in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states),
                     ("return_dict", return_dict)):
            if v is not None:
                args[k] = v
        return self._gpt2kern_hf_forward(**args)

    cfg = self.config
    if use_cache is None:
        use_cache = cfg.use_cache
    if output_hidden_states is None:
        output_hidden_states = cfg.output_hidden_states
    if return_dict is None:
        return_dict = getattr(cfg, "return_dict", True)
    input_shape = input_ids.shape
    if input_ids.dim() == 0 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be [batch, seq_len] with batch >= 1 and seq_len >= 1, "
                         f"got shape {tuple(input_shape)}")
    ids = input_ids.reshape(-1, input_shape[-1])
    if token_type_ids is not None:
        token_type_ids = token_type_ids.reshape(-1, input_shape[-1])
    B, T = ids.shape
    if position_ids is not None and (position_ids.shape[-1:] != (T,) or position_ids.numel() not in (T, B * T)):
        raise ValueError(f"position_ids must be [batch ({B}) or 1, seq_len ({T})], got shape "
                         f"{tuple(position_ids.shape)}")
    if use_cache and cache is None:
        cache = DynamicCache(config=cfg)
    hidden = None
    if not output_hidden_states and token_type_ids is None:
        hidden = _one_call(st, ids, cache, attention_mask, position_ids)
    if hidden is None:
        hidden, all_hidden = _walk(st, ids, cache, attention_mask, position_ids, token_type_ids, output_hidden_states)
    hidden = hidden.view(*input_shape, hidden.shape[-1])
    res = BaseModelOutputWithPastAndCrossAttentions(
        last_hidden_state=hidden, hidden_states=tuple(all_hidden) if output_hidden_states else None,
        **{_CACHE_FIELD: cache if use_cache else None})
    return res if return_dict else res.to_tuple()


def _masks(attention_mask, B, T, past):
    """HF's mask conventions -> the attention kernel's (key_mask, bias, causal)."""
    if attention_mask is None:
        return None, None, True
    if attention_mask.dim() == 2 or attention_mask.dim() == 1:
        if attention_mask.numel() % B:  # (HF views any 1-D/2-D mask as [batch, -1])
            raise ValueError(f"a 2-D attention_mask must be [batch ({B}), past + seq_len], got shape "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask.reshape(B, -1)
        if m.shape[1] < past + T:
            raise ValueError(f"attention_mask covers {m.shape[1]} positions but past ({past}) + input ({T}) "
                             f"= {past + T}")
        if m.dtype != torch.bool:
            m = m != 0
        return (None if bool(m.all()) else m), None, True
    if attention_mask.dim() == 4:  # already [B, 1|H, T, kv]: HF semantics, causality included
        m = attention_mask
        if m.shape[0] not in (1, B) or m.shape[2] != T or m.shape[3] < past + T:
            raise ValueError(f"a 4-D attention_mask must be [batch ({B}) or 1, 1 or heads, q_len ({T}), kv_len "
                             f"(>= past + q_len = {past + T})], got shape {tuple(m.shape)}")
        if m.dtype == torch.bool:
            bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
        else:
            m = m.float()
            bias = m.masked_fill(m <= torch.finfo(torch.float32).min / 2, float("-inf"))
        return None, bias, False
    raise ValueError(f"attention_mask must be 2-D [batch, kv_len] or 4-D [batch, 1, q_len, kv_len], "
                     f"got shape {tuple(attention_mask.shape)}")


def _one_call(st: _State, ids, cache, attention_mask, position_ids):
    """The same body as _walk in one C++ call (_C.Body, csrc/cpu/engine.cpp), or None where it does not serve the
    call: it takes HF's decode steps (a plain DynamicCache already holding the past) and calls without a cache, with a
    2-D mask or none. Returns the ln_f output; the cache's layers get the grown keys/values, exactly what
    DynamicLayer.update would have left there."""
    body, B, T = st.body, ids.shape[0], ids.shape[1]
    if (body is None or st.trace or ids.dtype not in _INTS
            or (position_ids is not None and (position_ids.dtype not in _INTS or position_ids.dim() != 2
                                              or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != T))
            or (attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                                                or attention_mask.dtype not in _MASK_DTYPES))):
        return None
    past = int(cache.get_seq_length()) if cache is not None else 0
    past_layers = _dynamic_layers(cache, len(st.layers), past)
    if past_layers is None:
        return None
    n_pos = st.transformer.config.n_positions
    if position_ids is None and past + T > n_pos:
        raise ValueError(f"sequence length {past + T} (past {past} + input {T}) exceeds n_positions={n_pos}")
    pos = None if position_ids is None else position_ids.long().expand(B, T).contiguous()
    past_k = None if cache is None else [ly.keys for ly in past_layers]
    past_v = None if cache is None else [ly.values for ly in past_layers]
    # a layer still holding the views the body returned last can grow them in place (see engine.cpp)
    append = [_holds_our_views(st, ly) for ly in past_layers]
    x, ks, vs = body.forward(ids.long().contiguous(), pos, attention_mask, past_k, past_v, append)
    if cache is not None:
        for ly, k, v in zip(cache.layers, ks, vs):
            ly.keys, ly.values = k, v
            st._grown[ly] = (weakref.ref(k), weakref.ref(v))
    return x


def _walk(st: _State, ids, cache, attention_mask, position_ids, token_type_ids, want_hidden):
    """The GPT-2 body on gpt2kern ops; returns (ln_f output, hidden states per HF's output_hidden_states)."""
    t = st.transformer
    layers, ln_f = st.layers, st.ln_f  # one consistent set of packs for the whole call
    B, T = ids.shape
    E, H = st.E, st.H
    D = E // H
    past = int(cache.get_seq_length()) if cache is not None else 0
    n_pos = t.config.n_positions
    if position_ids is None:
        if past + T > n_pos:
            raise ValueError(f"sequence length {past + T} (past {past} + input {T}) exceeds n_positions={n_pos}")
        position_ids = torch.arange(past, past + T, dtype=torch.long, device=ids.device).unsqueeze(0)
    else:
        position_ids = position_ids.reshape(-1, T)
    trace = st.trace
    key_mask, bias, causal = _masks(attention_mask, B, T, past)
    if trace:
        trace("wte", t.wte.weight.detach()[ids])
        trace("wpe", t.wpe.weight.detach()[position_ids])
    h = ops.embedding(ids, t.wte.weight.detach(), t.wpe.weight.detach(), position_ids, token_type_ids)
    hidden = [h] if want_hidden else None
    w, b, eps = layers[0]["ln_1"]
    x = ops.layer_norm(h, w, b, eps)
    for i, L in enumerate(layers):
        if trace:
            trace(f"h.{i}.ln_1", x)
        Wp, bias_, n = L["c_attn"]
        qkv = ops.conv1d(x, Wp, bias_, out_features=n)
        if trace:
            trace(f"h.{i}.attn.c_attn", qkv)
        q, k, v = (s.view(B, T, H, D).transpose(1, 2) for s in qkv.split(E, dim=2))
        if cache is not None:
            try:
                k, v = cache.update(k, v, i)
            except RuntimeError as e:  # torch.cat's message alone does not say what did not fit
                raise ValueError(f"past_key_values does not fit this call (layer {i}: batch {B}, {H} heads of "
                                 f"size {D}): {e}") from e
        a = ops.attention(q, k, v, key_mask, bias, L["scale"], past, causal)
        Wp, bias_, n = L["attn_proj"]
        a = ops.conv1d(a.view(B, T, E), Wp, bias_, out_features=n)
        if trace:
            trace(f"h.{i}.attn", a)
        w, b, eps = L["ln_2"]
        h, x = ops.add_layer_norm(a, h, w, b, eps)
        if trace:
            trace(f"h.{i}.ln_2", x)
        Wp, bias_, n = L["c_fc"]
        f = ops.conv1d(x, Wp, bias_, "gelu_new", out_features=n)
        if trace:
            trace(f"h.{i}.mlp.act", f)  # c_fc and NewGELU run as one fused kernel
        Wp, bias_, n = L["mlp_proj"]
        m = ops.conv1d(f, Wp, bias_, out_features=n)
        if trace:
            trace(f"h.{i}.mlp", m)
        w, b, eps = layers[i + 1]["ln_1"] if i + 1 < len(layers) else ln_f
        h, x = ops.add_layer_norm(m, h, w, b, eps)
        if trace:
            trace(f"h.{i}", h)
        if want_hidden and i + 1 < len(layers):
            hidden.append(h)
    if trace:
        trace("ln_f", x)
    if want_hidden:
        hidden.append(x)  # HF ties the last hidden state to ln_f's output
    return x, hidden


_INTS = (torch.long, torch.int32)
_MASK_DTYPES = (torch.bool, torch.long, torch.int32, torch.float32)


def _dynamic_layers(cache, n_layer, past):
    """The past layers when `cache` is a plain DynamicCache already holding `past` > 0 tokens in every layer (the
    decode steps of HF's generate), [] without a cache, else None (the per-op walk and cache.update serve it)."""
    if cache is None:
        return []
    if type(cache) is not DynamicCache or cache.offloading or past == 0 or len(cache.layers) != n_layer:
        return None
    for ly in cache.layers:
        if (type(ly) is not DynamicLayer or not ly.is_initialized or ly.keys is None or ly.keys.dim() != 4
                or ly.keys.shape[2] != past):
            return None
    return cache.layers


def _holds_our_views(st: _State, layer) -> bool:
    """Whether a cache layer still holds the very key/value tensors the body returned for it last (a cropped,
    reordered, copied or replaced cache holds others)."""
    rec = st._grown.get(layer)
    return rec is not None and rec[0]() is layer.keys and rec[1]() is layer.values


def _lm_head_forward(self, hidden_states):
    st: _State = self._gpt2kern
    if not st.body_was_fast or st.lm_w is None or (torch.is_grad_enabled() and self.weight.requires_grad) \
            or hidden_states.device != st.device or hidden_states.dtype != torch.float32:
        return self._gpt2kern_hf_forward(hidden_states)
    Wp, n = st.lm_w  # fresh: the body's call just ran refresh()
    logits = ops.conv1d(hidden_states, Wp, None, out_features=n)
    if st.trace:
        st.trace("lm_head", logits)
    return logits


# ---------------------------------------------------------------- public API

def optimize(model, *, freeze: bool = True):
    """Run `model` (GPT2LMHeadModel or GPT2Model) on gpt2kern's kernels, in place; returns the model.

    Idempotent. `freeze=True` sets requires_grad=False on the parameters, so plain `model(ids)` calls take the fast
    path without `torch.no_grad()`; calls that need autograd, training mode or features the kernels lack go to HF's
    own forward (see `fallback_reason`). Weights are packed now and repacked automatically if they change.
    """
    if isinstance(model, GPT2LMHeadModel):
        transformer, lm_head = model.transformer, model.lm_head
    elif isinstance(model, GPT2Model):
        transformer, lm_head = model, None
    else:
        raise TypeError(f"optimize expects a transformers GPT2LMHeadModel or GPT2Model, got {type(model).__name__}")
    if freeze:
        model.requires_grad_(False)
    if getattr(transformer, "_gpt2kern", None) is not None:
        transformer._gpt2kern.refresh()
        return model
    model.__dict__.pop("_gpt2kern_generate_state", None)  # gpt2kern.generate's own pack: this one replaces it
    st = _State(transformer, lm_head)
    transformer._gpt2kern = st
    transformer._gpt2kern_hf_forward = transformer.forward
    transformer.forward = types.MethodType(_gpt2model_forward, transformer)
    if lm_head is not None:
        lm_head._gpt2kern = st
        lm_head._gpt2kern_hf_forward = lm_head.forward
        lm_head.forward = types.MethodType(_lm_head_forward, lm_head)
    st.refresh()  # last: the watch list sees the attributes just set
    return model


def restore(model, *, unfreeze: bool = True):
    """Undo optimize(): HF's own forward again (and requires_grad=True if unfreeze)."""
    for mod in (getattr(model, "transformer", model), getattr(model, "lm_head", None)):
        if mod is not None and getattr(mod, "_gpt2kern", None) is not None:
            del mod.forward, mod._gpt2kern_hf_forward, mod._gpt2kern
    if unfreeze:
        model.requires_grad_(True)
    return model


def is_optimized(model) -> bool:
    return getattr(getattr(model, "transformer", model), "_gpt2kern", None) is not None


def fallback_reason(model) -> str | None:
    """Why the last forward call ran HF's path instead of the kernels (None if the kernels served it)."""
    st = getattr(getattr(model, "transformer", model), "_gpt2kern", None)
    if st is None:
        raise ValueError("model is not optimized (call gpt2kern.optimize(model) first)")
    return st.fallback_reason


@contextlib.contextmanager
def tracing(model):
    """Record every named step of the optimized forward, in execution order: yields a list of (name, tensor)."""
    st = getattr(getattr(model, "transformer", model), "_gpt2kern", None)
    if st is None:
        raise ValueError("model is not optimized (call gpt2kern.optimize(model) first)")
    records: list[tuple[str, torch.Tensor]] = []
    st.trace = lambda name, t: records.append((name, t.detach().clone()))
    try:
        yield records
    finally:
        st.trace = None
