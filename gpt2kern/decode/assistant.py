"""gpt2kern.draft_model: speculative decoding through Hugging Face's own `generate(assistant_model=...)`.

HF's assisted generation needs a second model to draft; this one is the same model in a reduced weight mode — a
twin GPT2LMHeadModel that shares every parameter tensor with the model (no fp32 copy) and runs on gpt2kern's kernels
with its own int8 (or fp16, bf16) pack:

    gpt2kern.optimize(model)
    model.generate(ids, assistant_model=gpt2kern.draft_model(model), max_new_tokens=64)

HF's generate then drafts with the twin and checks the drafts with the model's forward over several tokens. Greedy
gives HF greedy's tokens up to the last-ulp differences between a forward over several tokens and single-token
steps (HF's own assisted generation has the same caveat); gpt2kern.generate(..., speculative=...) is the exact
path, and faster (no Python per token).
"""
from __future__ import annotations

import copy

import torch
from transformers import GPT2LMHeadModel

from ..kernels.weights import check_mode
from ..model.dropin import optimize


def draft_model(model, weights: str = "int8") -> GPT2LMHeadModel:
    """A GPT2LMHeadModel that shares `model`'s parameters, optimized with `weights` ('int8', 'fp16' or 'bf16'):
    pass it as HF generate's `assistant_model`. It follows the model's weights: an in-place change to them repacks
    the twin's copy on its next call."""
    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"draft_model expects a transformers GPT2LMHeadModel, got {type(model).__name__}")
    check_mode(weights)
    if weights == "fp32":
        raise ValueError("draft_model: weights='fp32' would draft with the model itself; use 'int8', 'fp16' or "
                         "'bf16'")
    with torch.device("meta"):  # no weights allocated: the model's own tensors are assigned below
        twin = GPT2LMHeadModel(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(keep_vars=True), assign=True, strict=True)
    saved = set(twin.state_dict())
    for name, buf in model.named_buffers():  # buffers outside the state dict (non-persistent) are shared too
        if name not in saved:
            owner, _, attr = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(attr, buf, persistent=False)
    if model.lm_head.weight is model.transformer.wte.weight:
        twin.lm_head.weight = twin.transformer.wte.weight
    twin.generation_config = copy.deepcopy(model.generation_config)
    twin.set_attn_implementation(model.config._attn_implementation)
    twin.train(model.training)
    return optimize(twin, weights=weights)
