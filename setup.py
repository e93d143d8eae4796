# Builds gpt2kern._C: the CPU kernels always; the CUDA kernels (csrc/cuda/*.cu + ops_cuda.cpp) too when they are
# wanted — a GPU is visible (torch.cuda.is_available()) or GPT2KERN_CUDA=1 asks for them — and can be built: torch
# is a CUDA build and nvcc is found. Compiling them for a GPU that is not there took minutes for nothing.
# GPT2KERN_NO_CUDA=1 (or GPT2KERN_CUDA=0) forces a CPU-only build; GPT2KERN_REQUIRE_CUDA=1 asks for the CUDA
# kernels and makes a build without them an error (.ci/run sets it with GPT2KERN_CUDA=1 for the main build, so a
# silently CPU-only build cannot land).
# GPT2KERN_NO_EXT=1: the package without the extension (scripts/env.sh builds _C in place with build_ext --inplace,
# incremental and with progress, then installs the package editable with this, so pip does not build it again).
# GPT2KERN_SANITIZE=1 builds the CPU extension (only) with AddressSanitizer + UndefinedBehaviorSanitizer for
# scripts/asan.sh.
import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "buildtools"))  # pip's build backend does not put ROOT on sys.path
import libstdcxx  # noqa: E402


def _find_cuda_home():
    """CUDA_HOME for torch's build helpers. torch guesses it from `which nvcc`, which goes wrong when nvcc on PATH
    is a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no headers there). Prefer an explicit
    CUDA_HOME/CUDA_PATH, then a directory that really holds bin/nvcc and include/cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if all(os.path.isfile(os.path.join(c, *f)) for f in (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return c
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # before torch.utils.cpp_extension reads it at import

SANITIZE = os.environ.get("GPT2KERN_SANITIZE") == "1"
REQUIRE_CUDA = os.environ.get("GPT2KERN_REQUIRE_CUDA") == "1"


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cuda_decision():
    """(build the CUDA kernels?, why) — why is one line for the build log."""
    import torch

    if os.environ.get("GPT2KERN_NO_CUDA") == "1" or os.environ.get("GPT2KERN_CUDA") == "0":
        return False, "CUDA kernels off (GPT2KERN_NO_CUDA=1 / GPT2KERN_CUDA=0)"
    if SANITIZE:
        return False, "CUDA kernels off (sanitizer build)"
    asked = os.environ.get("GPT2KERN_CUDA") == "1" or REQUIRE_CUDA
    if not asked and not torch.cuda.is_available():
        return False, "CPU kernels only: no GPU visible (GPT2KERN_CUDA=1 builds the CUDA kernels too)"
    why = "GPT2KERN_CUDA=1" if os.environ.get("GPT2KERN_CUDA") == "1" else (
        "GPT2KERN_REQUIRE_CUDA=1" if asked else "a GPU is visible")
    if torch.version.cuda is None or _cuda_home is None or not rel("csrc/cuda/*.cu"):
        return False, (f"{why}, but the CUDA kernels cannot be built here (torch.version.cuda="
                       f"{torch.version.cuda}, CUDA_HOME={_cuda_home}): CPU kernels only")
    return True, f"CPU and CUDA kernels ({why})"


def nvidia_include_dirs():
    """torch's CUDA headers include cuBLAS/cuSPARSE headers that pip's nvidia-* wheels put under
    site-packages/nvidia/cu13/include (cu12 for CUDA 12 builds)."""
    import torch

    roots = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots += list(nvidia.__path__)
    except ImportError:
        pass
    roots += [os.path.join(p, "nvidia") for p in site.getsitepackages() + [site.getusersitepackages()]]
    major = (torch.version.cuda or "").split(".")[0]
    out = []
    for r in roots:
        for sub in (f"cu{major}", ""):
            d = os.path.join(r, sub, "include")
            if os.path.isdir(d) and d not in out and os.path.isfile(os.path.join(d, "cublas_v2.h")):
                out.append(d)
    return out


def extension_setup_args() -> dict:
    """setup() arguments for gpt2kern._C."""
    import torch
    from torch.utils import cpp_extension

    sources = rel("csrc/*.cpp") + rel("csrc/common/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    if os.environ.get("GPT2KERN_DEBUG") == "1":
        cxx = ["-O1", "-g", "-fopenmp", "-ffp-contract=fast", "-fno-omit-frame-pointer"]
    link = ["-fopenmp", *libstdcxx.LINK_ARGS]
    if SANITIZE:  # vptr off: torch's own libraries are not instrumented, their RTTI would give false reports
        san = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"]
        cxx = ["-O1", "-g1", "-fopenmp", "-ffp-contract=fast", "-fno-omit-frame-pointer"] + san
        link += san
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    Ext = cpp_extension.CppExtension
    want_cuda, why = cuda_decision()
    if want_cuda:
        Ext = cpp_extension.CUDAExtension
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        extra["cxx"] = cxx + ["-DGPT2KERN_CUDA"]
        # fp32 parity is the contract: accurate expf/division/sqrt, so no --use_fast_math.
        extra["nvcc"] = ["-O3", "-lineinfo", "-DGPT2KERN_CUDA"]
        include_dirs += nvidia_include_dirs()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to detect an arch from (CI, the dev machine): compile for H100/H200 only, which keeps the build
            # short. On a GPU machine torch picks that GPU's arch.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    elif REQUIRE_CUDA:
        raise SystemExit(f"GPT2KERN_REQUIRE_CUDA=1 but the CUDA kernels would not be built ({why}; "
                         f"GPT2KERN_NO_CUDA={os.environ.get('GPT2KERN_NO_CUDA')}, "
                         f"GPT2KERN_CUDA={os.environ.get('GPT2KERN_CUDA')})")
    print(f"gpt2kern build: {why}", file=sys.stderr, flush=True)
    return dict(
        ext_modules=[Ext("gpt2kern._C", sources, extra_compile_args=extra, extra_link_args=link,
                         include_dirs=include_dirs)],
        cmdclass={"build_ext": build_ext_class(cpp_extension.BuildExtension)},
    )


def build_ext_class(base):
    """torch's build_ext with ninja, checked for the shared libstdc++ (buildtools/libstdcxx.py): the C++ driver,
    which also links, is probed before anything is compiled, and each built extension after linking; a failure
    removes the file and stops with one line."""

    class BuildExt(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, use_ninja=True, **kwargs)

        def build_extensions(self):
            driver = list(self.compiler.compiler_cxx)
            why = libstdcxx.probe(driver)
            if why:
                raise SystemExit(libstdcxx.refusal(driver, why))
            super().build_extensions()
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                why = libstdcxx.problem(path)
                if why:
                    os.remove(path)
                    raise SystemExit(libstdcxx.refusal(driver, why))

    return BuildExt


# GPT2KERN_NO_EXT=1: no torch import at all (scripts/env.sh's editable install of an already built tree)
setup(**({} if os.environ.get("GPT2KERN_NO_EXT") == "1" else extension_setup_args()))
