"""SwiGLU feed-forward blocks: a dense MLP and the routed experts computed with torch (the reference path
the quantised Rust and GPU kernels are checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import QuantizedLinear, linear

Weight = torch.Tensor | QuantizedLinear


def swiglu(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); x [T, H], gate/up [I, H], down [H, I] -> [T, H]."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor:
    """Sum over each token's top-k experts of weight * expert(x).

    x [T, H], weights [T, k] (x's dtype), ids [T, k]; gate/up/down indexed by expert id.
    Experts are visited in ascending id order and accumulated in x's dtype, as the reference does.
    """
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        token, slot = torch.where(ids == e)
        y = swiglu(x[token], gate[e], up[e], down[e]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out
