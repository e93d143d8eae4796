"""gpt2kern — hand-written kernels for GPT-2 inference, as a drop-in forward for Hugging Face GPT-2.

The public names are imported on first use (PEP 562), not by `import gpt2kern`: torch and transformers take
seconds to import, and the `gpt2kern` command line (gpt2kern.cli, which lives in this package) must answer
`--help` and argument errors without them. `gpt2kern.optimize`, `from gpt2kern import ops`, ... work as before.

The package, from the bottom up (each layer imports only the ones above it in this list):
    kernels/   ops.py: the C++/CUDA ops (csrc/) as torch ops; weights.py: the weight formats they read
    model/     the drop-in forward on HF's GPT-2 classes (dropin.py), the one Python GPT-2 body (body.py), when
               the kernels may run (guard.py), loading models (loading.py), the named steps (steps.py)
    decode/    gpt2kern.generate over the C++ engine (generate.py), the CUDA-graph decoder (cuda_graph.py), a draft
               model for HF's assisted generation (assistant.py)
    cli/       the `gpt2kern` command (main.py), its benchmark (bench.py), error measures, terminal output
"""
import importlib
import importlib.util

# public name -> (submodule, attribute in it; None: the submodule itself)
_LAZY = {
    "ops": (".kernels.ops", None),
    "generate": (".decode.generate", "generate"),
    "generate_fallback_reason": (".decode.generate", "last_fallback_reason"),
    "draft_model": (".decode.assistant", "draft_model"),
    "load": (".model.loading", "load"),
    "optimize": (".model.dropin", "optimize"),
    "restore": (".model.dropin", "restore"),
    "tracing": (".model.dropin", "tracing"),
    "fallback_reason": (".model.dropin", "fallback_reason"),
    "is_optimized": (".model.dropin", "is_optimized"),
}
__all__ = ["ops", "generate", "generate_fallback_reason", "draft_model", "optimize", "restore", "load", "tracing",
           "fallback_reason", "is_optimized"]


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        mod, attr = f".{name}", None  # a subpackage (gpt2kern.model, gpt2kern.decode, ...), as eager imports bound
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    m = importlib.import_module(mod, __name__)
    value = m if attr is None else getattr(m, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

