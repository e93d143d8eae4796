"""load(name_or_path): a GPT2LMHeadModel (eval mode) and its tokenizer (or None).

Accepted names:
  random:<config>   exact GPT-2 family configs with seeded random weights (offline default: random:distilgpt2),
                    with GPT-2-like outlier channels planted in the residual stream, and GPT-2's real tokenizer
                    (gpt2_tokenizer(): OpenAI's vocab.json + merges.txt, shipped in gpt2kern/tokenizer/);
                    random:tiny (a 99-token vocabulary) has none
  a local directory written by save_pretrained
  a Hugging Face Hub name (needs the Hub or the local HF cache)
"""
from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

# The exact shapes of the released checkpoints (n_positions 1024, vocab 50257) and HF's tiny test config.
RANDOM_CONFIGS = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=99, n_positions=512, bos_token_id=98, eos_token_id=98),
}
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenizer")
GPT2_VOCAB_SIZE = 50257  # 50,000 merges + 256 bytes + <|endoftext|>


def gpt2_tokenizer():
    """HF's GPT-2 tokenizer (byte-level BPE, what every released GPT-2 checkpoint uses), built from the vocab.json
    and merges.txt shipped in gpt2kern/tokenizer/ (OpenAI's files; see the LICENSE there): no network, ~50 ms.
    A new object each call, so that changing one (pad token, added tokens) changes no other."""
    from transformers import GPT2TokenizerFast

    # from_pretrained on the directory: GPT2TokenizerFast(vocab_file=..., merges_file=...) silently builds an empty
    # vocabulary in transformers 5 (the arguments became vocab=/merges=); a directory is read the same in 4 and 5
    return GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR, local_files_only=True, model_max_length=1024)


# Trained GPT-2 carries a few residual channels in the thousands; random weights do not, so plant some.
OUTLIER_CHANNELS = {138: 3000.0, 378: -1500.0, 447: 800.0}
WEIGHT_SCALE = 5.0


def random_config(name: str) -> GPT2Config:
    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random config {name!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    kw = dict(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256)
    kw.update(RANDOM_CONFIGS[name])
    return GPT2Config(**kw)


def random_model(name: str = "distilgpt2", seed: int = 0, attn_implementation: str = "eager",
                 outliers: bool = True, device=None) -> GPT2LMHeadModel:
    """GPT-2 config `name` with seeded random weights (see load). `device`: where the weights are created and drawn
    (default the CPU; a GPU draws gpt2-xl's 1.5 B weights in milliseconds, other values than the CPU's)."""
    config = random_config(name)
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    t = model.transformer
    with torch.no_grad():
        # Trained GPT-2's matrices have std ~0.1-0.2, not a fresh init's 0.02; at 0.02 the model is near-constant
        # (greedy repeats one token whatever the prompt), which would make token-parity tests weak.
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(WEIGHT_SCALE)
        if outliers and config.n_embd >= 256:  # a few huge channels among hundreds, as in trained GPT-2
            first = min(1, config.n_layer - 1)
            for c, val in OUTLIER_CHANNELS.items():
                t.h[first].mlp.c_proj.bias[c] += val
                # and, as there, every later LayerNorm gives them a tiny gain: the residual stream carries values
                # in the thousands without drowning what the model computes from its input
                for ln in [b.ln_1 for b in t.h[first + 1:]] + [b.ln_2 for b in t.h[first + 1:]] + [t.ln_f]:
                    ln.weight[c] = 0.01
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def load(name_or_path: str = "random:distilgpt2", *, attn_implementation: str = "eager", seed: int = 0):
    """Returns (model, tokenizer or None). The model is in eval mode, fp32, on the CPU. random:* models get GPT-2's
    tokenizer (none for random:tiny); a directory or Hub model its own, or None when it was saved without one."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model must be a non-empty string, got {name_or_path!r}")
    if name_or_path.startswith("random:"):
        model = random_model(name_or_path[len("random:"):], seed=seed, attn_implementation=attn_implementation)
        # GPT-2's tokenizer for GPT-2's vocabulary; random:tiny's 99 ids are not GPT-2 tokens: no tokenizer
        return model, gpt2_tokenizer() if model.config.vocab_size == GPT2_VOCAB_SIZE else None
    if os.path.isdir(name_or_path):
        model = GPT2LMHeadModel.from_pretrained(name_or_path, attn_implementation=attn_implementation)
        tok = None
        if any(os.path.exists(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "vocab.json")):
            tok = AutoTokenizer.from_pretrained(name_or_path)
        return model.eval(), tok
    if name_or_path.startswith((".", "~", "/")) or name_or_path.count("/") > 1:  # a path, not "org/name"
        raise ValueError(f"model directory {name_or_path!r} does not exist")
    local_only = True  # the local HF cache first: no network at all when the model is there
    try:
        model = GPT2LMHeadModel.from_pretrained(name_or_path, attn_implementation=attn_implementation,
                                                local_files_only=True)
    except OSError:
        local_only = False
        if not _hub_reachable():
            raise ValueError(f"{name_or_path!r} is not in the local Hugging Face cache and the Hub is not reachable; "
                             f"pass a local save_pretrained directory or 'random:distilgpt2'") from None
        try:
            model = GPT2LMHeadModel.from_pretrained(name_or_path, attn_implementation=attn_implementation)
        except OSError as e:
            raise ValueError(f"cannot load {name_or_path!r} from the Hugging Face Hub ({str(e).splitlines()[0]}); "
                             f"pass a local save_pretrained directory or 'random:distilgpt2'") from None
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
