"""Quantised CPU weights backed by the Rust core: routed experts in one ExpertStore, dense matrices
(shared experts, dense MLPs, lm_head) as INT8 QuantMatrix objects."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .._core import ExpertStore, QuantMatrix
from ..models.spec import ArchSpec

log = logging.getLogger("krasis")

DEFAULT_GROUP_SIZE = 128


def pick_group_size(k: int, preferred: int = DEFAULT_GROUP_SIZE) -> int:
    """The largest supported group size (128, 64, 32) that divides the input dimension k."""
    for g in (preferred, 128, 64, 32):
        if k % g == 0:
            return g
    raise ValueError(f"input dimension {k} is not a multiple of 32; it cannot be quantised in groups")


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


class CPUQuantLinear:
    """A weight [N, K] quantised to INT8/INT4 and multiplied by the Rust kernels; returns x's dtype."""

    def __init__(self, weight: torch.Tensor, bits: int = 8):
        self.matrix = QuantMatrix.from_float(_f32(weight), bits, pick_group_size(weight.shape[1]))
        self.shape = tuple(weight.shape)

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


def new_expert_store(spec: ArchSpec, bits: int) -> ExpertStore:
    """An empty store sized for every MoE layer of ``spec``."""
    moe_layers = sum(layer.is_moe for layer in spec.layers)
    h, i = spec.hidden_size, spec.moe.intermediate_size
    group = min(pick_group_size(h), pick_group_size(i))
    store = ExpertStore(moe_layers, spec.moe.num_experts, h, i, bits, group)
    log.info("CPU expert store: %d layers x %d experts, INT%d, group %d, %.1f MB", moe_layers,
             spec.moe.num_experts, bits, group, moe_layers * spec.moe.num_experts * store.expert_nbytes / 1e6)
    return store


def experts_factory(spec: ArchSpec, bits: int):
    """A ``load_weights`` experts factory that quantises each layer's experts into one shared store."""
    store = new_expert_store(spec, bits)
    slots: dict[int, int] = {}

    def build(layer_index: int, read_expert) -> CPUExpertLayer:
        slot = slots.setdefault(layer_index, len(slots))
        for e in range(spec.moe.num_experts):
            t = read_expert(e)
            store.set_expert(slot, e, _f32(t["gate"]), _f32(t["up"]), _f32(t["down"]))
        return CPUExpertLayer(store, slot)

    return build
