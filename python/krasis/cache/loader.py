"""Building a model's CPU weights from a checked cache: routed experts memory-mapped straight from the cache
files into the Rust ExpertStore (no parse, no copy), INT8 dense matrices from their safetensors files, the
rest (attention in BF16, norms, routers, embeddings) from the model's own safetensors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .. import _core
from ..checkpoint import Checkpoint
from ..engine.cpu_quant import CPUExpertLayer, CPUQuantLinear
from ..engine.weights import ModelWeights, load_weights
from ..models.spec import ArchSpec
from .parts import expert_dir, expert_group
from .quant_config import QuantConfig

log = logging.getLogger("krasis")


def _int8_matrices(path: Path) -> dict[str, CPUQuantLinear]:
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        for role, desc in meta.items():
            n, k, bits, group = (int(v) for v in desc.split(","))
            matrix = _core.QuantMatrix(f.get_tensor(f"{role}.qweight"), f.get_tensor(f"{role}.scales"), n, k, bits,
                                       group)
            out[role] = CPUQuantLinear(matrix)
    return out


def load_cached_weights(ckpt: Checkpoint, spec: ArchSpec, dtype: torch.dtype, quant: QuantConfig,
                        directory: Path) -> ModelWeights:
    """ModelWeights on the CPU with routed experts and INT8 matrices taken from the cache in ``directory``."""
    moe_layers = [i for i, layer in enumerate(spec.layers) if layer.is_moe]
    store = None
    if moe_layers:
        paths = [str(directory / expert_dir(spec, quant) / f"layer_{i:03d}.bin") for i in moe_layers]
        store = _core.ExpertStore.open(paths, spec.moe.num_experts, spec.hidden_size, spec.moe.intermediate_size,
                                       quant.cpu_expert_bits, expert_group(spec, quant))
        log.info("CPU experts: %d layers x %d experts INT%d memory-mapped from %s (%.2f GB)", len(moe_layers),
                 spec.moe.num_experts, quant.cpu_expert_bits, directory,
                 len(moe_layers) * spec.moe.num_experts * store.expert_nbytes / 1e9)
    slots = {layer: slot for slot, layer in enumerate(moe_layers)}

    def experts(layer_index: int, _read_expert) -> CPUExpertLayer:
        return CPUExpertLayer(store, slots[layer_index])

    int8: dict[int, dict[str, CPUQuantLinear]] = {}
    for index in range(spec.num_layers):
        path = directory / "dense_int8" / f"layer_{index:03d}.safetensors"
        if path.is_file():
            int8[index] = _int8_matrices(path)
    skip = {name for index, roles in int8.items() for name in _names(spec, index, roles)}
    lm_path = directory / "dense_int8" / "lm_head.safetensors"
    if lm_path.is_file() and not spec.tie_word_embeddings:
        skip.add(spec.lm_head_name)
    weights = load_weights(ckpt, spec, dtype, "cpu", experts_factory=experts, skip=skip)
    for index, roles in int8.items():
        layer = weights.layers[index]
        for role, matrix in roles.items():
            target = layer.attention if role in spec.layers[index].names.attention else layer.mlp
            target[role] = matrix
    if lm_path.is_file():
        weights.lm_head = _int8_matrices(lm_path)["lm_head"]
    return weights


def _names(spec: ArchSpec, index: int, roles) -> list[str]:
    n = spec.layers[index].names
    return [n.attention.get(role) or n.mlp[role] for role in roles]
