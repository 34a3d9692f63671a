"""The CUDA driver's entry points for copies the host queues on a copy engine while a decode graph runs.

The Rust extension's decode link queues the prefetch's expert copies itself (``expert_copy`` there): the step
graph's prediction is only known on the device, the copy engine needs its source address when the copy is
queued, and a copy kernel inside the graph would hold SMs the step's own kernels need. The extension does not
link CUDA; it is handed the addresses of three driver functions resolved here by name from ``libcuda``, the
context torch made current and a stream of its own.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch


class DriverCopies(NamedTuple):
    """What the extension queues copies with: the addresses of ``cuMemcpyHtoDAsync``, ``cuStreamWriteValue64``
    and ``cuCtxSetCurrent``, the CUDA context (``CUcontext``) and the stream (``CUstream``)."""

    memcpy: int
    write_value: int
    set_context: int
    context: int
    stream: int


@functools.cache
def _entry_points() -> tuple[int, int, int, ctypes.CDLL]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"the CUDA driver library (libcuda.so.1) could not be loaded: {e}") from e

    def address(*names: str) -> int:
        for name in names:  # the versioned name first: the unversioned one may be an older ABI
            if hasattr(lib, name):
                return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        raise RuntimeError(f"the CUDA driver lacks {names[-1]} (a driver of CUDA 11.7 or later has it)")

    return (address("cuMemcpyHtoDAsync_v2"), address("cuStreamWriteValue64_v2", "cuStreamWriteValue64"),
            address("cuCtxSetCurrent"), lib)


def driver_copies(stream: torch.cuda.Stream) -> DriverCopies:
    """The driver's copy entry points with the primary context of ``stream``'s device (the one torch uses, made
    current by the extension on whichever thread queues the copies) and ``stream``. A RuntimeError names what is
    missing."""
    memcpy, write_value, set_context, lib = _entry_points()
    device, context = ctypes.c_int(), ctypes.c_void_p()
    rc = lib.cuDeviceGet(ctypes.byref(device), stream.device.index or 0)
    if rc == 0:
        rc = lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
    if rc != 0 or not context.value:
        raise RuntimeError(f"the CUDA device's primary context could not be had (CUDA error {rc})")
    return DriverCopies(memcpy, write_value, set_context, context.value, stream.cuda_stream)
