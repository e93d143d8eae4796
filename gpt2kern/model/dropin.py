"""optimize(model): GPT-2's body on gpt2kern's kernels, installed in place on any Hugging Face GPT-2 class.

The body (body.blocks; `_walk` runs it with HF's masks and Cache API) reads like the model itself:

    h = wte[ids] + wpe[pos]                                   embedding
    x = ln_1(h)                                               layer_norm
    for each block:  qkv = c_attn(x)                          conv1d
                     k, v = cache.update(k, v)                HF's Cache API (dynamic, static, beams...)
                     a = c_proj(softmax(q·kᵀ·scale + mask)·v)  attention, conv1d
                     h, x = h + a, ln_2(h + a)                add_layer_norm
                     m = c_proj(gelu_new(c_fc(x)))            conv1d with the gelu epilogue fused, conv1d
                     h, x = h + m, next_ln(h + m)             add_layer_norm (next block's ln_1, or ln_f)
    logits = x @ wteᵀ                                         conv1d (lm_head)

HF's decode steps (and calls without a cache) run the same body in one C++ call instead (`_one_call`: no Python per
layer). The model class's own forward stays HF's (signature, logits_to_keep, loss, pooling, heads, output types);
only the GPT2Model body and a GPT-2 lm_head run here. The weights the body reads are weights.py's records; whether a
call may run here at all is guard.py's `why_not` — when it says no, the whole call runs HF's own code.
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
from transformers import GPT2Model, GPT2PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from ..kernels import cuda_table, ops
from ..kernels.weights import Weights, attn_scale, pack
from . import guard
from .body import blocks

# transformers renamed past_key_values -> cache (5.24); speak whichever this version speaks.
_CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"
_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPastAndCrossAttentions)}
                else "past_key_values")


class State:
    """One model's packed weights (weights.Weights) and the guard's view of it.

    Threads may share one optimized model: repacking is serialized by a lock and published whole (the snapshot
    last, so a thread that finds it unchanged finds the packs complete), and what a call did (fallback_reason,
    body_was_fast) is kept per thread, so one thread's fallback never sends another thread's lm_head down the wrong
    path."""

    def __init__(self, transformer: GPT2Model, lm_head: nn.Module | None, pack: bool = False, mode: str = "fp32"):
        self.pack = pack  # True: a packed fp32 copy of every matmul weight (optimize(model, pack=True)); else in place
        self.mode = mode  # the weights' stored dtype (optimize(model, weights=...)): 'fp32', 'fp16', 'bf16', 'int8'
        self._lock = threading.Lock()
        self._local = threading.local()
        self.transformer, self.lm_head = transformer, lm_head
        self.snapshot: guard.Snapshot | None = None  # taken by refresh(); None: look at the model again
        self.model_reason: str | None = None  # the guard's answer for the model (config, classes, hooks, training)
        self.weights: Weights | None = None  # None where the kernels cannot run the model (device, dtype, config)
        self.body = None  # _C.Body over the same packs (CPU): the whole body in one C++ call
        self.device = None  # where the parameters (and packs) live
        self._pack_key = None  # what the packs were made from: (parameter stamp, config reason, _baked_in)
        self.trace = None  # callable(name, tensor) while tracing
        # cache layer -> weak references to the key/value views the body last returned for it (see _one_call); kept
        # here, not on HF's layer objects, so caches still pickle and deepcopy as before
        self._grown = weakref.WeakKeyDictionary()

    # per thread: what this thread's last forward call did
    fallback_reason = property(lambda self: getattr(self._local, "fallback_reason", None),
                               lambda self, v: setattr(self._local, "fallback_reason", v))
    body_was_fast = property(lambda self: getattr(self._local, "body_was_fast", False),
                             lambda self, v: setattr(self._local, "body_was_fast", v))

    def __getstate__(self):  # copy.deepcopy / pickle of an optimized model: a fresh lock and per-thread state
        d = dict(self.__dict__)
        del d["_lock"], d["_local"]
        # repacked on the first eager call (the copy's parameters live elsewhere, so its snapshot reads as changed);
        # the snapshot and packs come along so a copy compiled before any eager call still has them
        d.update(body=None, _grown=None, _pack_key=None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock, self._local, self._grown = threading.Lock(), threading.local(), weakref.WeakKeyDictionary()

    @property
    def params(self) -> tuple:
        """The parameters the current packs were made from (the live ones, after refresh())."""
        return self.snapshot.params

    def refresh(self):
        """Look at the model again if anything changed since the last look (guard.Snapshot), and repack the
        weights if they changed (load_state_dict, in-place edits, .to(), replaced Parameters or modules, another
        eps or scaling)."""
        if self.snapshot is not None and not self.snapshot.changed():
            return
        with self._lock:  # one thread packs; the others wait for it, then find the snapshot unchanged
            snap = guard.Snapshot(self.transformer, self.lm_head)  # first: a change made while this runs is seen
            t = self.transformer
            config_reason = guard.config_reason(t, self.lm_head)
            key = (snap.stamp, config_reason, None if config_reason else _baked_in(t), self.pack, self.mode)
            if key != self._pack_key:
                self._repack(snap.params, config_reason)
                self._pack_key = key
            self.model_reason = config_reason or guard.bypass_reason(t)
            self.snapshot = snap

    def _repack(self, params, config_reason):
        devs = {p.device for p in params}
        self.device = devs.pop() if len(devs) == 1 else None
        if self.device is not None and self.device.type == "cuda" and ops.has_cuda():
            cuda_table.apply_once(self.device)  # this GPU's measured prefill variants, once per process
        weights = body = None
        if (config_reason is None and self.device is not None and self.device.type in guard._kernel_devices()
                and all(p.dtype == torch.float32 for p in params)):
            weights = pack(self.transformer, self.lm_head, self.pack, self.mode)  # CUDA: 'kn' in the mode's dtype
            body = weights.body() if self.device.type == "cpu" else None
        self.weights, self.body = weights, body


def hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """The position_ids HF's generate gives a left-padded prompt (generation/utils.py): cumsum of the mask - 1,
    padding at 0. gpt2kern.generate's engine and the CUDA graph decoder take theirs from here."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _baked_in(t: GPT2Model):
    """The numbers the packs hold besides the weights: each LayerNorm's eps and each layer's attention scale."""
    return tuple((blk.ln_1.eps, blk.ln_2.eps, attn_scale(t.config, blk.attn)) for blk in t.h) + (t.ln_f.eps,)


def state_of(model, mode: str | None = None, slot: str = "_gpt2kern_private_state") -> State:
    """The gpt2kern state of an optimized model, up to date — or, for a model that is not optimized or asked for
    another weight mode than it was optimized with, gpt2kern.generate's private one (fp32 in place unless `mode`)."""
    transformer, lm_head = _body_and_head(model)
    st = getattr(transformer, "_gpt2kern", None)
    if st is None or (mode is not None and mode != st.mode):  # the model itself is left untouched
        mode = mode or "fp32"
        st = model.__dict__.get(slot)  # (slot: a second private pack beside it, e.g. a speculative draft's)
        if st is None or st.transformer is not transformer or st.lm_head is not lm_head or st.mode != mode:
            st = State(transformer, lm_head, mode=mode)
            model.__dict__[slot] = st
    st.refresh()
    return st


def _body_and_head(model) -> tuple[GPT2Model, nn.Module | None]:
    """The GPT2Model body of any HF GPT-2 class and its lm_head (None for the classes without one)."""
    if isinstance(model, GPT2Model):
        return model, None
    body = getattr(model, "transformer", None)
    if isinstance(model, GPT2PreTrainedModel) and isinstance(body, GPT2Model):
        head = getattr(model, "lm_head", None)
        return body, head if isinstance(head, nn.Module) else None
    raise TypeError(f"gpt2kern expects a transformers GPT-2 model (GPT2Model, GPT2LMHeadModel, "
                    f"GPT2DoubleHeadsModel, GPT2ForSequenceClassification, GPT2ForTokenClassification, "
                    f"GPT2ForQuestionAnswering), got {type(model).__name__}")


# ---------------------------------------------------------------- the forward

def _hf_deprecations(fn):
    """`fn` behind the keyword deprecations HF's GPT2Model.forward carries (today: past_key_values -> cache), made by
    HF's own deprecate_kwarg with the arguments read from HF's wrapper, so the same call gives the same warning; `fn`
    itself on a transformers without them."""
    found = []
    f = GPT2Model.forward
    while f is not None:
        if getattr(f, "__closure__", None) and "old_name" in f.__code__.co_freevars:  # deprecate_kwarg's wrapper
            found.append(inspect.getclosurevars(f).nonlocals)
        f = getattr(f, "__wrapped__", None)
    from transformers.utils.deprecation import deprecate_kwarg

    for a in reversed(found):  # innermost first, so the wrappers nest as HF's do
        version = a["version_message"].rsplit(" ", 1)[-1]  # "... removed in version X" / "... from version X"
        fn = deprecate_kwarg(a["old_name"], version, new_name=a["new_name"],
                             warn_if_greater_or_equal_version=a["warn_if_greater_or_equal_version"],
                             raise_if_greater_or_equal_version=a["raise_if_greater_or_equal_version"],
                             raise_if_both_names=a["raise_if_both_names"],
                             additional_message=a["additional_message"])(fn)
    return fn


def _gpt2model_forward(self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None,
                       position_ids=None, inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                       use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                       past_key_values=None, **kwargs):
    st: State = self._gpt2kern
    if cache is None:
        cache = past_key_values
    why = guard.why_not(st, "forward", input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache,
                        encoder_hidden_states=encoder_hidden_states, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (under torch.compile: decided at trace time, not recorded per call)
        st.fallback_reason, st.body_was_fast = why, why is None
    if why is not None:
        if st.trace is not None and not compiling:
            raise untraceable(why)
        args = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=position_ids, inputs_embeds=inputs_embeds,
                    encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                    use_cache=use_cache, **kwargs)
        args[_CACHE_ARG] = cache
        for k, v in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states),
                     ("return_dict", return_dict)):
            if v is not None:
                args[k] = v
        return _hf_forward(self)(**args)

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
    self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)  # as HF's forward does
    ids = input_ids.reshape(-1, input_shape[-1])
    if token_type_ids is not None:
        token_type_ids = token_type_ids.reshape(-1, input_shape[-1])
    B, T = ids.shape
    if position_ids is not None and (position_ids.shape[-1:] != (T,) or position_ids.numel() not in (T, B * T)):
        raise ValueError(f"position_ids must be [batch ({B}) or 1, seq_len ({T})], got shape "
                         f"{tuple(position_ids.shape)}")
    if attention_mask is not None and attention_mask.dim() == 3 and attention_mask.numel() % B == 0:
        attention_mask = attention_mask.reshape(B, -1)  # GPT2DoubleHeadsModel's [batch, choices, seq], as HF views it
    if use_cache and cache is None:
        cache = DynamicCache(config=cfg)
    hidden = None
    if not output_hidden_states and token_type_ids is None and not compiling:
        hidden = _one_call(st, ids, cache, attention_mask, position_ids)
    if hidden is None:
        hidden, all_hidden = _walk(st, ids, cache, attention_mask, position_ids, token_type_ids, output_hidden_states)
    hidden = hidden.view(*input_shape, hidden.shape[-1])
    if output_hidden_states:
        all_hidden[-1] = hidden  # HF's last hidden state is ln_f's output in the input's shape
    res = BaseModelOutputWithPastAndCrossAttentions(
        last_hidden_state=hidden, hidden_states=tuple(all_hidden) if output_hidden_states else None,
        **{_CACHE_FIELD: cache if use_cache else None})
    return res if return_dict else res.to_tuple()


_gpt2model_forward.__name__ = "forward"  # (HF's deprecation message names the function)
_forward = _hf_deprecations(_gpt2model_forward)


def _masks(attention_mask, B, T, past):
    """HF's mask conventions -> the attention kernel's (key_mask, bias, causal). `past` is None under torch.compile
    with a static cache (its length is a tensor there): the mask is then 4-D, as HF builds it."""
    if attention_mask is None:
        return None, None, True
    if attention_mask.dim() < 4:
        if attention_mask.dim() == 0 or attention_mask.numel() % B:  # (HF views any 1-3-D mask as [batch, -1])
            raise ValueError(f"a 2-D attention_mask must be [batch ({B}), past + seq_len], got shape "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask.reshape(B, -1)
        if past is not None and m.shape[1] < past + T:
            raise ValueError(f"attention_mask covers {m.shape[1]} positions but past ({past}) + input ({T}) "
                             f"= {past + T}")
        if m.dtype != torch.bool:
            m = m != 0
        if torch.compiler.is_compiling():  # (reading the values would break the graph; an all-True mask is exact)
            return m, None, True
        return (None if bool(m.all()) else m), None, True
    if attention_mask.dim() == 4:  # already [B, 1|H, T, kv]: HF semantics, causality included
        m = attention_mask
        if m.shape[0] not in (1, B) or m.shape[2] != T or (past is not None and m.shape[3] < past + T):
            raise ValueError(f"a 4-D attention_mask must be [batch ({B}) or 1, 1 or heads, q_len ({T}), kv_len "
                             f"(>= past + q_len = {past + T if past is not None else 'past + q_len'})], "
                             f"got shape {tuple(m.shape)}")
        if m.dtype == torch.bool:
            bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
        else:
            m = m.float()
            bias = m.masked_fill(m <= torch.finfo(torch.float32).min / 2, float("-inf"))
        return None, bias, False
    raise ValueError(f"attention_mask must be 2-D [batch, kv_len] or 4-D [batch, 1, q_len, kv_len], "
                     f"got shape {tuple(attention_mask.shape)}")


def _one_call(st: State, ids, cache, attention_mask, position_ids):
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
    past_layers = _dynamic_layers(cache, len(st.weights.layers), past)
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


def _walk(st: State, ids, cache, attention_mask, position_ids, token_type_ids, want_hidden):
    """HF's forward around body.blocks (positions, masks, HF's Cache API); returns (ln_f output, hidden states
    per HF's output_hidden_states)."""
    t, W = st.transformer, st.weights  # one consistent set of packs for the whole call
    B, T = ids.shape
    E, H = t.config.n_embd, W.n_head
    D = E // H
    seen = cache.get_seq_length() if cache is not None else 0
    # While torch.compile traces, a cache's length may be a tensor (static cache) or symbolic: no Python int is read
    # from it (past = None); positions and the mask are then built from it with tensor ops, as HF's forward does.
    past = None if (cache is not None and torch.compiler.is_compiling()) else int(seen)
    if position_ids is None:
        n_pos = t.config.n_positions
        if past is not None and past + T > n_pos:
            raise ValueError(f"sequence length {past + T} (past {past} + input {T}) exceeds n_positions={n_pos}")
        position_ids = (torch.arange(T, dtype=torch.long, device=ids.device) + seen).unsqueeze(0)
    else:
        position_ids = position_ids.reshape(-1, T)
    trace = st.trace
    if trace:
        trace("wte", W.wte[ids])
        trace("wpe", W.wpe[position_ids])
    h = ops.embedding(ids, W.wte, W.wpe, position_ids, token_type_ids)
    if past is None and (attention_mask is None or attention_mask.dim() != 4):  # as HF builds it (see _masks)
        from transformers.masking_utils import create_causal_mask

        # the cache by position: its keyword is past_key_values before transformers 5.24 and cache after
        attention_mask = create_causal_mask(t.config, h, attention_mask, cache, position_ids=position_ids,
                                            allow_is_causal_skip=False)
    key_mask, bias, causal = _masks(attention_mask, B, T, past)

    def attend(i, q, k, v, qkv):
        if cache is not None:
            try:
                k, v = cache.update(k, v, i)
            except RuntimeError as e:  # torch.cat's message alone does not say what did not fit
                raise ValueError(f"past_key_values does not fit this call (layer {i}: batch {B}, {H} heads of "
                                 f"size {D}): {e}") from e
        return ops.attention(q, k, v, key_mask, bias, W.layers[i].scale, past or 0, causal)

    hidden = [h] if want_hidden else None
    # HF's hidden states: the embedding, each block's output but the last, then ln_f's output
    kept = {f"h.{i}" for i in range(len(W.layers) - 1)} | {"ln_f"}

    def name(step, tensor):
        if trace:
            trace(step, tensor)
        if want_hidden and step in kept:
            hidden.append(tensor)

    x = blocks(W, h, attend, name=name if trace or want_hidden else None)
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


def _holds_our_views(st: State, layer) -> bool:
    """Whether a cache layer still holds the very key/value tensors the body returned for it last (a cropped,
    reordered, copied or replaced cache holds others)."""
    rec = st._grown.get(layer)
    return rec is not None and rec[0]() is layer.keys and rec[1]() is layer.values


def _lm_head_forward(self, hidden_states):
    st: State = self._gpt2kern
    why = guard.why_not(st, "lm_head", hidden=hidden_states)
    if why is not None:
        if st.trace is not None and not torch.compiler.is_compiling():
            raise untraceable(why)
        return _hf_forward(self)(hidden_states)
    logits = st.weights.lm_head(hidden_states)
    if st.trace:
        st.trace("lm_head", logits)
    return logits


class _FromHF:
    """An attribute of an _Installed instance read from HF's forward it replaced (see there); on the class itself,
    `on_class`, so inspect.signature(_Installed) and help(_Installed) still describe the class."""

    def __init__(self, get, on_class=None):
        self.get, self.on_class = get, on_class

    def __get__(self, obj, owner=None):
        return self.on_class if obj is None else self.get(_hf_forward(obj.module))


class _Installed(guard.InstalledForward):
    """The fast forward optimize() installs on a module instance. A class with __reduce__ rather than a bound method,
    so an optimized model still pickles (torch.save) and loads: pickle would look a bound method up by its name.

    It answers introspection as HF's forward it replaced (the instance's earlier forward, else its class's, bound):
    inspect.signature(model.forward) is HF's — HF's Trainer keeps the dataset columns that are forward parameters,
    test suites look for inputs_embeds there — and so are its docstring and name. Read when asked, not stored, so
    pickle and deepcopy carry nothing new and a copy answers for its own module."""

    __signature__ = _FromHF(inspect.signature)
    __doc__ = _FromHF(lambda f: f.__doc__, on_class=__doc__)
    __name__ = _FromHF(lambda f: f.__name__)

    def __init__(self, module, which: str):
        self.module, self.which = module, which

    def __call__(self, *args, **kwargs):
        if self.which == "body":
            return _forward(self.module, *args, **kwargs)
        if len(args) == 1 and not kwargs:  # how HF's heads call it: lm_head(hidden_states)
            return _lm_head_forward(self.module, *args)
        return _lm_head_by_keyword(self.module, args, kwargs)

    def __reduce__(self):
        return _Installed, (self.module, self.which)


def _lm_head_by_keyword(module, args, kwargs):
    """lm_head called other than with one positional tensor: bound as HF's forward would bind it (nn.Linear's
    `input=`), so a call HF accepts runs here too and one it refuses raises HF's own TypeError."""
    hf = _hf_forward(module)
    try:
        bound = inspect.signature(hf).bind(*args, **kwargs)
    except TypeError:
        return hf(*args, **kwargs)
    if len(bound.arguments) != 1 or bound.signature.parameters[next(iter(bound.arguments))].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return hf(*args, **kwargs)
    return _lm_head_forward(module, *bound.arguments.values())


def _hf_forward(module):
    """HF's own forward of a module optimize() replaced: the instance's earlier forward if it had one, else its
    class's."""
    f = module.__dict__.get("_gpt2kern_hf_forward")
    return f if f is not None else types.MethodType(type(module).forward, module)


# ---------------------------------------------------------------- public API

def optimize(model, *, freeze: bool = False, pack: bool = False, weights: str = "fp32"):
    """Run `model`'s GPT-2 body (and its lm_head) on gpt2kern's kernels, in place; returns the model.

    Any HF GPT-2 class: GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification,
    GPT2ForTokenClassification, GPT2ForQuestionAnswering — their heads, pooling and losses stay HF's. Idempotent.
    Calls that need autograd (grad enabled and a parameter requiring grad), training mode or features the kernels
    lack run HF's own forward (see `fallback_reason`, and guard.py for every case); `requires_grad` is left as it
    is. `freeze=True` (opt-in) sets requires_grad=False on every parameter, so a plain `model(ids)` without
    `torch.no_grad()` takes the fast path too. Weights are packed now and repacked automatically if they change.

    `weights`: how the matmul weights are stored. 'fp32' (default: HF's logits up to float32 rounding, HF's tokens)
    reads HF's own tensors in place, so optimize() adds no copy of them; `pack=True` (opt-in) keeps a packed fp32
    copy, faster in prefill (bench/RESULTS.md). 'fp16', 'bf16' and 'int8' keep a packed copy in that dtype (1/2, 1/2
    and ~1/4 of the fp32 bytes; activations and sums stay fp32): decode reads fewer bytes per token, at a measured
    error (README, "Weight modes"). On CUDA the reduced modes keep an [in, out] copy in that dtype (int8 with its
    group scales) read by the CUDA kernels (csrc/cuda/matmul_lowp.cu); `pack` applies to CPU only. A reduced mode
    needs gpt2kern's kernels on the model's device (CPU, or CUDA in a CUDA build): elsewhere it is refused, since
    HF's fp32 forward would run instead.
    """
    from ..kernels.weights import check_mode

    check_mode(weights)
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be True or False, got {pack!r}")
    transformer, lm_head = _body_and_head(model)
    devs = {p.device.type for p in transformer.parameters()}
    if weights != "fp32" and devs - set(guard._kernel_devices()):
        raise ValueError(f"weights={weights!r} runs on {' or '.join(d.upper() for d in guard._kernel_devices())} "
                         f"only; this model is on {', '.join(sorted(devs))} (use weights='fp32' there)")
    if freeze:
        model.requires_grad_(False)
    if getattr(transformer, "_gpt2kern", None) is not None:
        st = transformer._gpt2kern
        if (st.pack, st.mode) != (pack, weights):
            with st._lock:
                st.pack, st.mode, st.snapshot = pack, weights, None  # repacked in the other format now
        st.refresh()
        return model
    model.__dict__.pop("_gpt2kern_private_state", None)  # gpt2kern.generate's own pack: this one replaces it
    model.__dict__.pop("_gpt2kern_draft_state", None)  # and its speculative draft's
    st = State(transformer, lm_head, pack, weights)
    for mod, which in ((transformer, "body"), (lm_head, "lm_head")):
        if mod is None:
            continue
        mod._gpt2kern = st
        if "forward" in mod.__dict__:  # a forward the instance already had: HF's path calls that one
            mod._gpt2kern_hf_forward = mod.__dict__["forward"]
        mod.forward = _Installed(mod, which)
    st.refresh()  # last: the snapshot sees the attributes just set
    return model


def restore(model, *, unfreeze: bool = False):
    """Undo optimize(): HF's own forward again (and requires_grad=True on every parameter if unfreeze)."""
    transformer, lm_head = _body_and_head(model)
    for mod in (transformer, lm_head):
        if mod is not None and getattr(mod, "_gpt2kern", None) is not None:
            del mod.forward, mod._gpt2kern
            if "_gpt2kern_hf_forward" in mod.__dict__:
                mod.forward = mod.__dict__.pop("_gpt2kern_hf_forward")
    if unfreeze:
        model.requires_grad_(True)
    return model


def _state_or_none(model):
    try:
        transformer, _ = _body_and_head(model)
    except TypeError:
        return None
    return getattr(transformer, "_gpt2kern", None)


def is_optimized(model) -> bool:
    return _state_or_none(model) is not None


def fallback_reason(model) -> str | None:
    """Why the last forward call (in this thread, outside torch.compile) ran HF's path instead of the kernels (None
    if the kernels served it)."""
    st = _state_or_none(model)
    if st is None:
        raise ValueError("model is not optimized (call gpt2kern.optimize(model) first)")
    return st.fallback_reason


@contextlib.contextmanager
def tracing(model):
    """Record every named step of the optimized forward, in execution order: yields a list of (name, tensor).

    Only the kernels' path has these steps. A call inside the block that the guard hands to HF's own code (a plain
    `model(ids)` with grad enabled, training mode, output_attentions=True, ...: guard.CASES) raises ValueError
    saying why instead of running, and so does gpt2kern.generate's engine, which has no per-step trace; a block
    in which no forward of the model ran raises too. The list is never silently empty or incomplete."""
    st = _state_or_none(model)
    if st is None:
        raise ValueError("model is not optimized (call gpt2kern.optimize(model) first)")
    records: list[tuple[str, torch.Tensor]] = []
    st.trace = lambda name, t: records.append((name, t.detach().clone()))
    try:
        yield records
    finally:
        st.trace = None
    if not records:
        raise ValueError("gpt2kern.tracing recorded no steps: no forward of the optimized model ran inside the "
                         "`with` block (call model(ids) or model.generate(...) in it)")


def untraceable(why: str) -> ValueError:
    """The error for a call that gpt2kern.tracing cannot record because the guard sends it to HF's path (`why`)."""
    if why.startswith("autograd"):
        fix = ("call it under torch.no_grad() or torch.inference_mode(), or optimize(model, freeze=True) "
               "(model.generate needs neither: it runs under no_grad)")
    elif why.startswith("training mode"):
        fix = "call model.eval() first"
    else:
        fix = "HF's path has no such steps (the cases: python -m gpt2kern.model.guard)"
    return ValueError(f"gpt2kern.tracing records the kernels' steps, but this call took HF's path ({why}): {fix}")


def tracing_open(model) -> bool:
    """Whether gpt2kern.tracing(model) is open (for entry points that run no traced forward)."""
    st = _state_or_none(model)
    return st is not None and st.trace is not None
