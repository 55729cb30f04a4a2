"""Build of horovod-local: the Python package plus the optional C++/CUDA extension ``horovod_local._C``.

    pip install --no-build-isolation --no-deps -e .     # torch must already be installed

- torch with CUDA and a CUDA toolkit (CUDA_HOME) -> CUDAExtension: CPU kernels + CUDA kernels
  (csrc/cuda/*.cu, bindings.cpp) compiled with -DWITH_CUDA; one module serves both devices.
- CPU-only torch -> CppExtension with the CPU kernels only.
- torch not importable at build time, or HOROVOD_LOCAL_NO_EXT=1 -> no extension; the pure-PyTorch
  fallback in horovod_local/torch/_kernels.py serves (``backend_info()`` says why).

Set TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to choose the GPU architectures, MAX_JOBS to limit the
parallel compile jobs. torch and horovod are installed by scripts/setup.sh, deliberately not
listed in install_requires (pip would otherwise pull a CUDA build of torch).
"""
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(ROOT, "horovod_local", "__init__.py"), encoding="utf-8") as f:
        m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    if not m:
        raise RuntimeError("horovod_local/__init__.py defines no __version__")
    return m.group(1)


def warn(msg: str) -> None:
    print(f"WARNING (horovod-local setup.py): {msg}", file=sys.stderr)


def extensions():
    """(ext_modules, cmdclass) for the build; empty when no extension is built."""
    if os.environ.get("HOROVOD_LOCAL_NO_EXT", "0") not in ("", "0"):
        warn("HOROVOD_LOCAL_NO_EXT is set: not building horovod_local._C; "
             "the PyTorch fallback will be used.")
        import glob
        stale = glob.glob(os.path.join(ROOT, "horovod_local", "_C*.so"))
        if stale:
            warn(f"an earlier in-place build is still there and will be imported: {stale}; "
                 "delete it, or set HOROVOD_LOCAL_BACKEND=python at run time.")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension as ce
    except Exception as e:  # ImportError, or a broken torch install
        warn(f"torch is not importable ({e!r}): not building horovod_local._C; the PyTorch "
             "fallback will be used. Install torch first and reinstall with "
             "--no-build-isolation to get the extension.")
        return [], {}

    os.environ.setdefault("MAX_JOBS", "2")
    # torch chooses the C++ standard (C++20 for torch 2.13); -ffp-contract=off keeps a*b+c from
    # being fused into an FMA, so results match the PyTorch fallback bit for bit.
    # -fno-wrapv undoes the -fwrapv of Python's own CFLAGS, which stops GCC from vectorising the
    # int64-indexed loops.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-wrapv"]
    link_flags = ["-fopenmp"]
    sources = ["csrc/cpu/fused_sync.cpp"]
    with_cuda = bool(torch.version.cuda) and ce.CUDA_HOME is not None
    if with_cuda:
        sources += ["csrc/cuda/bindings.cpp", "csrc/cuda/fused_sync_kernels.cu"]
        ext = ce.CUDAExtension(
            "horovod_local._C", sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"],
                                "nvcc": ["-O3", "-DWITH_CUDA"]},
            extra_link_args=link_flags,
        )
    else:
        if torch.version.cuda and ce.CUDA_HOME is None:
            warn("torch has CUDA but no CUDA toolkit was found (CUDA_HOME): building the CPU "
                 "kernels only; CUDA tensors will use the PyTorch fallback.")
        ext = ce.CppExtension("horovod_local._C", sources, extra_compile_args=cxx_flags,
                              extra_link_args=link_flags)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="horovod-local",
    version=read_version(),
    description="Local SGD, ADPSGD, Local AdaAlter and SlowMo on top of Horovod, with fused syncs",
    packages=find_packages(include=["horovod_local", "horovod_local.*"],
                           exclude=["tests", "tests.*"]),
    python_requires=">=3.9",
    install_requires=["numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
