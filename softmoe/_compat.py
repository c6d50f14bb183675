"""Work-arounds for third-party packages, in one place."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import torch

# Keeps the op schemas defined by `define_missing_torchvision_ops` alive (a torch Library is
# unregistered when garbage-collected).
_TORCHVISION_OP_SCHEMAS = []


def define_missing_torchvision_ops() -> bool:
    """torchvision's PyPI wheels are CUDA builds; on a CPU-only torch their C++ extension
    cannot load, which torchvision tolerates, except that 0.17-0.28 then register fake
    kernels for `torchvision::nms` / `qnms` unconditionally and crash at import with
    "operator torchvision::nms does not exist" (pytorch/vision#9337). Defining the two op
    schemas first lets the import succeed; calling `torchvision.ops.nms` then raises
    torchvision's own "Couldn't load custom C++ ops" error, as upstream's fix does.
    Does nothing if torchvision is absent or already imported, or its extension loads.
    Returns True if it defined the schemas."""
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = list(spec.submodule_search_locations)[0]
    libs = [os.path.join(folder, "_C" + s) for s in importlib.machinery.EXTENSION_SUFFIXES
            if os.path.isfile(os.path.join(folder, "_C" + s))]
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])  # what torchvision does first; loading twice is harmless
        return False
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OP_SCHEMAS.append(lib)
    return True


def import_torchvision_datasets():
    """`torchvision.datasets`, or None if torchvision is not installed or cannot be imported
    (with the CPU-only-torch work-around above applied first)."""
    try:
        define_missing_torchvision_ops()
        import torchvision.datasets as tvd
    except (ImportError, RuntimeError, OSError):
        return None
    return tvd
