"""Build demem_ext._C: the C++ CPU kernels always, the CUDA kernels when possible.

DEMEM_BUILD_CUDA=0|1|auto (default auto): auto builds CUDA when torch is a CUDA build
and nvcc is found. TORCH_CUDA_ARCH_LIST defaults to "9.0+PTX" (sm_90 code plus PTX
that the driver JIT-compiles for other GPUs).
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup


def _cuda_home_from_nvcc():
    """The CUDA prefix of the nvcc on PATH, asked from nvcc itself ("#$ TOP=..." of --dryrun).

    torch.utils.cpp_extension guesses CUDA_HOME as dirname(dirname(which nvcc)); with a wrapper
    script such as /usr/local/bin/nvcc that is /usr/local, which has no CUDA headers or libcudart.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            if os.path.isdir(os.path.join(top, "include")):
                return top
    return None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    _home = _cuda_home_from_nvcc()
    if _home is not None:
        os.environ["CUDA_HOME"] = _home  # before torch.utils.cpp_extension reads it
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def _want_cuda() -> bool:
    mode = os.environ.get("DEMEM_BUILD_CUDA", "auto").lower()
    if mode not in {"0", "1", "auto"}:
        raise ValueError(f"DEMEM_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    available = torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None
    )
    if mode == "1" and not available:
        raise RuntimeError("DEMEM_BUILD_CUDA=1 but torch is not a CUDA build or nvcc is missing")
    return mode == "1" or (mode == "auto" and available)


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        return CUDAExtension(
            "demem_ext._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("DEMEM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "demem_ext._C",
        cpp_sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
