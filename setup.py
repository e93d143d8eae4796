# Builds gpt2kern._C: the CPU kernels always; the CUDA kernels (csrc/cuda/*.cu) too when torch is a CUDA build and
# nvcc is found. GPT2KERN_NO_CUDA=1 forces a CPU-only build. GPT2KERN_SANITIZE=1 builds the CPU extension (only)
# with AddressSanitizer + UndefinedBehaviorSanitizer for scripts/asan.sh.
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


SANITIZE = os.environ.get("GPT2KERN_SANITIZE") == "1"


def want_cuda():
    if os.environ.get("GPT2KERN_NO_CUDA") == "1" or SANITIZE:
        return False
    import torch

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc and bool(rel("csrc/cuda/*.cu"))


sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
if os.environ.get("GPT2KERN_DEBUG") == "1":
    cxx = ["-O1", "-g", "-fopenmp", "-ffp-contract=fast", "-fno-omit-frame-pointer"]
link = ["-fopenmp"]
if SANITIZE:  # vptr off: torch's own libraries are not instrumented, their RTTI would give false reports
    san = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"]
    cxx = ["-O1", "-g1", "-fopenmp", "-ffp-contract=fast", "-fno-omit-frame-pointer"] + san
    link += san
extra = {"cxx": cxx}
Ext = cpp_extension.CppExtension
if want_cuda():
    Ext = cpp_extension.CUDAExtension
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    extra["cxx"] = cxx + ["-DGPT2KERN_CUDA"]
    extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "-DGPT2KERN_CUDA"]

setup(
    ext_modules=[
        Ext("gpt2kern._C", sources, extra_compile_args=extra, extra_link_args=link, include_dirs=[os.path.join(ROOT, "csrc")])
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
