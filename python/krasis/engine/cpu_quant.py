"""Quantised CPU weights backed by the Rust core: a layer's routed experts inside the model's ExpertStore,
and quantised dense matrices (shared experts, dense MLPs, lm_head, optionally attention)."""

from __future__ import annotations

import numpy as np
import torch

from .._core import ExpertStore, QuantMatrix


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


class CPUQuantLinear:
    """A quantised weight [N, K] multiplied by the Rust kernels; returns x's dtype."""

    def __init__(self, matrix: QuantMatrix):
        self.matrix = matrix
        self.shape = (matrix.n, matrix.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matrix.forward(_f32(x.reshape(-1, x.shape[-1])))
        return torch.from_numpy(y).to(x.dtype).reshape(*x.shape[:-1], self.shape[0])


class CPUExpertLayer:
    """One MoE layer's routed experts inside a model-wide ExpertStore."""

    def __init__(self, store: ExpertStore, slot: int):
        self.store, self.slot = store, slot

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = self.store.forward(self.slot, _f32(x), ids.to(torch.int64).contiguous().numpy(), _f32(weights))
        return torch.from_numpy(out).to(x.dtype)
