"""The expert store's own memory as the GPU engine's host copy of the routed experts: each layer buffer of an
``ExpertStore`` (page-aligned, owned by the extension) wrapped as a tensor without a copy and, on CUDA,
registered with the driver for DMA (page-locked). Prefill's streaming, the hot cache's fills and decode's
streamed experts then copy straight from the bytes the CPU kernels read: one copy of the experts in host RAM."""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from ..kernels import ExpertLayout, GPUExperts

log = logging.getLogger("krasis")

# cuMemHostRegister flags: read-only (the device only reads the experts; no write access asked of the pages),
# else none.
_READ_ONLY, _DEFAULT = 8, 0


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """The CUDA driver library (None without one). Registration goes through the driver API: a refused call there
    returns its error, where the runtime's would also stay behind as its "last error" for the next kernel launch
    check to report."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostRegister_v2.restype = ctypes.c_int
    lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    lib.cuMemHostUnregister.restype = ctypes.c_int
    return lib


# (address, what keeps its memory alive) left registered because their owner went while a CUDA graph was being
# captured on this thread (the garbage collector runs anywhere): unregistering then would break the capture
_deferred: list[tuple[int, object]] = []


def _unregister(address: int, owner: object) -> None:
    if torch.cuda.is_current_stream_capturing():
        _deferred.append((address, owner))
    else:
        _driver().cuMemHostUnregister(address)


def _unregister_deferred() -> None:
    if _deferred and not torch.cuda.is_current_stream_capturing():
        for address, _ in _deferred:
            _driver().cuMemHostUnregister(address)
        _deferred.clear()


def _register(address: int, nbytes: int) -> bool:
    driver = _driver()
    if driver is None:
        return False
    _unregister_deferred()
    torch.cuda.synchronize()  # a runtime call on this thread: the device's context is current for the driver's
    return any(driver.cuMemHostRegister_v2(address, nbytes, flags) == 0 for flags in (_READ_ONLY, _DEFAULT))


class StoreMemory:
    """``layers``: one GPUExperts per MoE layer over ``store``'s buffers (kept alive here), page-locked on CUDA."""

    def __init__(self, store, layout: ExpertLayout, device: torch.device):
        self.store = store
        self.layers: list[GPUExperts] = []
        self._registered: list[int] = []
        self.copied = 0  # layers that could not be registered and were copied into pinned memory
        self._kept: list[torch.Tensor] = []  # other tensors registered here (``register``)
        for address, nbytes in store.buffers():
            # a view of memory the store owns: valid while ``self.store`` lives
            buf = (ctypes.c_uint8 * nbytes).from_address(address)
            buf._owner = store  # the tensor below keeps ``buf``, and so the store, alive
            raw = torch.frombuffer(buf, dtype=torch.uint8).view(nbytes // layout.nbytes, layout.nbytes)
            if device.type == "cuda":
                if _register(address, nbytes):
                    self._registered.append(address)
                else:
                    # the GPU's kernels read host experts in place, which needs page-locked memory: a copy
                    raw = torch.empty_like(raw, pin_memory=True).copy_(raw)
                    self.copied += 1
            self.layers.append(GPUExperts(raw, layout))
        if self.copied:
            log.warning("routed experts: CUDA could not page-lock the expert store's memory for %d of %d layers; "
                        "those layers are copied into pinned memory instead (%.2f GB more host RAM)", self.copied,
                        len(self.layers), self.copied * self.layers[0].nbytes / 1e9)

    def register(self, tensor: torch.Tensor) -> bool:
        """Also page-lock ``tensor``'s host memory (contiguous; kept alive here until unregistered), e.g. the
        embedding table a decode graph reads; whether CUDA took it."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not torch.cuda.is_available():
            return False
        if not _register(tensor.data_ptr(), tensor.nbytes):
            return False
        self._registered.append(tensor.data_ptr())
        self._kept.append(tensor)  # registered memory must not be freed before it is unregistered
        return True

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def close(self) -> None:
        """Unregister the memory (before the store that owns it is dropped)."""
        owner = self.store, self._kept  # kept alive until unregistered, if that has to wait
        for address in self._registered:
            _unregister(address, owner)
        self._registered = []
        self._kept = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be gone
            pass
