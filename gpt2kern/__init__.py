"""gpt2kern — hand-written kernels for GPT-2 inference, as a drop-in forward for Hugging Face GPT-2.

The public names are imported on first use (PEP 562), not by `import gpt2kern`: torch and transformers take
seconds to import, and the `gpt2kern` command line (gpt2kern.cli, which lives in this package) must answer
`--help` and argument errors without them. `gpt2kern.optimize`, `from gpt2kern import ops`, ... work as before.
"""
import importlib
import importlib.util
import sys
import types


# public name -> (submodule, attribute in it; None: the submodule itself)
_LAZY = {
    "ops": (".ops", None),
    "generate": (".generate", "generate"),
    "generate_fallback_reason": (".generate", "last_fallback_reason"),
    "load": (".loading", "load"),
    "optimize": (".model", "optimize"),
    "restore": (".model", "restore"),
    "tracing": (".model", "tracing"),
    "fallback_reason": (".model", "fallback_reason"),
    "is_optimized": (".model", "is_optimized"),
}
__all__ = ["ops", "generate", "generate_fallback_reason", "optimize", "restore", "load", "tracing", "fallback_reason",
           "is_optimized"]


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        mod, attr = f".{name}", None  # a submodule (gpt2kern.model, gpt2kern.loading, ...), as eager imports bound
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    m = importlib.import_module(mod, __name__)
    value = m if attr is None else getattr(m, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`gpt2kern.generate` is the function, as it was when __init__ imported it eagerly. Python binds a submodule
    to its package's attribute when the submodule is first imported (`from gpt2kern.generate import ...`, or
    gpt2kern.model importing it), which would make `gpt2kern.generate` the module gpt2kern/generate.py."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType) and hasattr(value, "generate"):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
