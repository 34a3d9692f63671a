"""One linear-layer call for every weight representation: a torch tensor, or a quantised matrix object with
``forward(x)`` (the Rust INT8/INT4 kernels)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class QuantizedLinear(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y [T, N] = x [T, K] @ W^T, returned in x's dtype."""
        ...


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias) for a torch weight [N, K] or a quantised one."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w(x)
    return y if bias is None else y + bias
