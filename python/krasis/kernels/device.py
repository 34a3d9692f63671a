"""Properties of the GPU the kernels are sized for."""

from __future__ import annotations

import functools

import torch

# what launch sizes assume off CUDA (tests in the Triton interpreter): an H100's count
DEFAULT_SMS = 132


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (DEFAULT_SMS off CUDA)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
