"""gpt2kern — hand-written kernels for GPT-2 inference, as a drop-in forward for Hugging Face GPT-2."""
from . import ops
from .generate import generate
from .generate import last_fallback_reason as generate_fallback_reason
from .loading import load
from .model import fallback_reason, is_optimized, optimize, restore, tracing

__all__ = ["ops", "generate", "generate_fallback_reason", "optimize", "restore", "load", "tracing", "fallback_reason", "is_optimized"]
