"""The kernel implementations under test, shared by tests/test_kernels*.py: the extension
(C++ on CPU, CUDA on GPU) and the PyTorch fallback. Extension comparisons skip when the extension
is not built, unless HOROVOD_LOCAL_REQUIRE_EXT=1 (then they fail)."""
from __future__ import annotations

import os

import pytest
import torch

from horovod_local.torch import _kernels as K

REQUIRE_EXT = os.environ.get("HOROVOD_LOCAL_REQUIRE_EXT", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                 reason="no CUDA device"))]

# The extension, also when HOROVOD_LOCAL_BACKEND=python made the fallback the default.
_CPP, _CPP_ERROR = (K._cpp, "") if K._cpp is not None else K._load_extension()


def cpp_backend(device: str = "cpu"):
    """The extension backend for `device`, or skip (fail under HOROVOD_LOCAL_REQUIRE_EXT=1)."""
    if _CPP is None:
        msg = f"extension horovod_local._C not importable ({_CPP_ERROR})"
        if REQUIRE_EXT:
            pytest.fail(msg + " but HOROVOD_LOCAL_REQUIRE_EXT=1")
        pytest.skip(msg)
    if device == "cuda" and not _CPP.with_cuda:
        msg = "horovod_local._C was built without CUDA kernels"
        if REQUIRE_EXT:
            pytest.fail(msg + " but HOROVOD_LOCAL_REQUIRE_EXT=1 and a GPU is present")
        pytest.skip(msg)
    return _CPP


def backend(name: str, device: str = "cpu"):
    """'cpp': the extension (see cpp_backend); anything else: the fallback."""
    return cpp_backend(device) if name == "cpp" else K._python
