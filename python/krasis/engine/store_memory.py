"""The expert store's own memory as the GPU engine's host copy of the routed experts: each layer buffer of an
``ExpertStore`` (page-aligned, owned by the extension) wrapped as a tensor without a copy and, on CUDA,
registered with the driver for DMA (page-locked). Prefill's streaming, the hot cache's fills and decode's
streamed experts then copy straight from the bytes the CPU kernels read: one copy of the experts in host RAM."""

from __future__ import annotations

import ctypes
import logging

import torch

from ..kernels import ExpertLayout, GPUExperts

log = logging.getLogger("krasis")

# cudaHostRegister flags: read-only (the device only reads the experts; no write access asked of the pages),
# else the default.
_READ_ONLY, _DEFAULT = 8, 0


def _register(address: int, nbytes: int) -> bool:
    cudart = torch.cuda.cudart()
    for flags in (_READ_ONLY, _DEFAULT):
        if cudart.cudaHostRegister(address, nbytes, flags) == cudart.cudaError.success:
            return True
    # a failed runtime call is also the runtime's "last error", which the next kernel launch check would report
    last_error = getattr(cudart, "cudaGetLastError", None)
    if last_error is not None:
        last_error()
    return False


class StoreMemory:
    """``layers``: one GPUExperts per MoE layer over ``store``'s buffers (kept alive here), page-locked on CUDA."""

    def __init__(self, store, layout: ExpertLayout, device: torch.device):
        self.store = store
        self.layers: list[GPUExperts] = []
        self._registered: list[int] = []
        self.copied = 0  # layers that could not be registered and were copied into pinned memory
        for address, nbytes in store.buffers():
            # a view of memory the store owns: valid while ``self.store`` lives
            buf = (ctypes.c_uint8 * nbytes).from_address(address)
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
        """Also page-lock ``tensor``'s host memory (contiguous; it must outlive this object, or be closed with
        it), e.g. the embedding table a decode graph reads; whether CUDA took it."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not torch.cuda.is_available():
            return False
        if not _register(tensor.data_ptr(), tensor.nbytes):
            return False
        self._registered.append(tensor.data_ptr())
        return True

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def close(self) -> None:
        """Unregister the memory (before the store that owns it is dropped)."""
        if self._registered:
            cudart = torch.cuda.cudart()
            for address in self._registered:
                cudart.cudaHostUnregister(address)
            self._registered = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be gone
            pass
