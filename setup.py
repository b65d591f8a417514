"""Build tsv_fast._C: the CPU ops always, the CUDA kernels when a CUDA toolkit is usable.

    python setup.py build_ext --inplace        # or: pip install --no-build-isolation -e .
    TSV_FAST_NO_CUDA=1 ...                      # force a CPU-only build
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch


def find_cuda_home():
    """CUDA_HOME, else the real toolkit root printed by `nvcc -dryrun` (nvcc may be a wrapper)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "x.cu"], capture_output=True, text=True).stderr
        top = re.search(r"^#\$ TOP=(.+)$", out, re.M)
    except OSError:
        return None
    return os.path.realpath(top.group(1).strip()) if top else None


WITH_CUDA = bool(torch.version.cuda) and os.environ.get("TSV_FAST_NO_CUDA") != "1"
if WITH_CUDA:
    cuda_home = find_cuda_home()
    WITH_CUDA = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if WITH_CUDA:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

include_dirs = [os.path.abspath("csrc")]
try:  # cuBLAS/cuSOLVER/cuSPARSE headers from the nvidia-* wheels (ATen CUDA headers need them)
    import nvidia

    include_dirs += [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "cu[0-9]*", "include"))]
except ImportError:
    pass

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
ext_kwargs = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
if WITH_CUDA:
    ext = CUDAExtension(
        "tsv_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("TSV_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
        **ext_kwargs,
    )
else:
    ext = CppExtension("tsv_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)
print(f"tsv_fast: building {'CPU + CUDA' if WITH_CUDA else 'CPU-only'} extension", file=sys.stderr)

setup(
    name="tsv-fast",
    version="0.1.0",
    description="Task Singular Vectors model merging with fused CPU/CUDA kernels",
    packages=find_packages(include=["tsv_fast", "tsv_fast.*"]),
    package_data={"tsv_fast.evaluation": ["assets/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors", "tqdm", "pyyaml"],  # torch deliberately omitted
    entry_points={"console_scripts": ["tsv-fast=tsv_fast.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
