"""Handing memory back to the OS between a stage's phases, so that the next phase's peak is its own.

Two ways a freed phase kept its memory, both measured at 3B (benchmarks/results/memory_3b.md):
- glibc keeps freed heap: after neural-compressor's static int8 pass on the vision encoder the
  process held 3.58 GB it had freed, 0.44 GB after malloc_trim, and the decoder's calibration
  came on top of it. `release_freed` collects garbage and trims.
- mapped checkpoint pages: see `half_releasing_pages`.
Both are Linux (glibc) calls; elsewhere they do nothing more than gc and `.half()`.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys

import torch


def release_freed() -> None:
    """gc.collect(), then glibc's malloc_trim(0): freed heap goes back to the OS now."""
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages are dropped, nothing is lost)


def half_releasing_pages(model: torch.nn.Module) -> torch.nn.Module:
    """`model.half()`, handing each fp32 weight's pages back to the kernel once its fp16 copy is made.

    transformers maps the safetensors file and its fp32 weights are views of that mapping, which
    is unmapped only when the last of them is freed: `.half()` held every mapped fp32 page (11.6 GB
    at 3B, all touched by the wrapper parity run) beside the 5.9 GB of fp16 copies, 18.2 GB
    (benchmarks/results/memory_3b.md). madvise(MADV_PAGEOUT) on the pages wholly inside each
    converted weight drops them as it goes: a clean page of a file mapping is re-read from the file
    if touched again, and a modified one (copy on write) is only swapped, never discarded, so no
    weight can change. Elsewhere than Linux this is plain `.half()`."""
    page = mmap.PAGESIZE
    madvise = _libc_madvise()

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        half = tensor.half()
        start = -(-tensor.data_ptr() // page) * page
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
        if madvise and tensor.device.type == "cpu" and end > start:
            madvise(start, end - start, _MADV_PAGEOUT)  # a hint: an error only means the pages stay
        return half

    return model._apply(convert)


def _libc_madvise():
    """libc's madvise on Linux (MADV_PAGEOUT's number is Linux's), else None."""
    madvise = _libc_function("madvise")
    if madvise is not None:
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _libc_function(name: str):
    if sys.platform != "linux":
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
