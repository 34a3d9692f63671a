"""Building a model's weights from a checked cache: routed experts memory-mapped straight from the cache
files into the Rust ExpertStore (no parse, no copy), INT8 dense matrices from their safetensors files, the
rest (attention in BF16, norms, routers, embeddings) from the model's own safetensors. On a GPU the INT8
matrices are repacked into the GPU layout and the routed experts are handed to a caller-built runtime."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .. import _core
from ..checkpoint import Checkpoint
from ..engine.cpu_quant import CPUExpertLayer, CPUQuantLinear
from ..engine.weights import ModelWeights, load_weights
from ..models.spec import ArchSpec
from .parts import expert_file, expert_group
from .quant_config import QuantConfig

log = logging.getLogger("krasis")

# (packed weights uint8 [N, K*bits/8], scales float32 [N, K/group], n, k, bits, group) -> a linear layer
MatrixFactory = Callable[[np.ndarray, np.ndarray, int, int, int, int], object]


def cpu_matrix(qweight: np.ndarray, scales: np.ndarray, n: int, k: int, bits: int, group: int) -> CPUQuantLinear:
    return CPUQuantLinear(_core.QuantMatrix(qweight, scales, n, k, bits, group))


def _int8_matrices(path: Path, make: MatrixFactory) -> dict[str, object]:
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        for role, desc in meta.items():
            n, k, bits, group = (int(v) for v in desc.split(","))
            out[role] = make(f.get_tensor(f"{role}.qweight"), f.get_tensor(f"{role}.scales"), n, k, bits, group)
    return out


def open_expert_store(spec: ArchSpec, quant: QuantConfig, directory: Path) -> tuple[_core.ExpertStore, list[Path]]:
    """The routed experts of every MoE layer, memory-mapped from the cache, and their files."""
    moe_layers = [i for i, layer in enumerate(spec.layers) if layer.is_moe]
    paths = [directory / expert_file(spec, quant, i) for i in moe_layers]
    store = _core.ExpertStore.open([str(p) for p in paths], spec.moe.num_experts, spec.hidden_size,
                                   spec.moe.intermediate_size, quant.cpu_expert_bits, expert_group(spec, quant))
    log.info("CPU experts: %d layers x %d experts INT%d memory-mapped from %s (%.2f GB)", len(moe_layers),
             spec.moe.num_experts, quant.cpu_expert_bits, directory,
             len(moe_layers) * spec.moe.num_experts * store.expert_nbytes / 1e9)
    return store, paths


def open_gpu_expert_store(spec: ArchSpec, quant: QuantConfig, directory: Path) -> _core.ExpertStore:
    """The cache's GPU expert files (``ensure_cache(..., gpu_experts=True)`` builds them: a width other than the
    CPU's, or no CPU experts in the cache) as an ExpertStore, memory-mapped."""
    moe_layers = [i for i, layer in enumerate(spec.layers) if layer.is_moe]
    paths = [str(directory / expert_file(spec, quant, i, "gpu")) for i in moe_layers]
    return _core.ExpertStore.open(paths, spec.moe.num_experts, spec.hidden_size, spec.moe.intermediate_size,
                                  quant.gpu_expert_bits, expert_group(spec, quant))


def load_cached_weights(ckpt: Checkpoint, spec: ArchSpec, dtype: torch.dtype, quant: QuantConfig,
                        directory: Path, device: torch.device | str = "cpu",
                        experts_factory: Callable[[int], object] | None = None,
                        matrix_factory: MatrixFactory = cpu_matrix) -> ModelWeights:
    """ModelWeights with INT8 matrices taken from the cache in ``directory``.

    On the CPU (default) routed experts come from the cache's ExpertStore; otherwise
    ``experts_factory(slot)`` gives MoE layer number ``slot``'s experts and the embedding stays in host memory.
    """
    moe_layers = [i for i, layer in enumerate(spec.layers) if layer.is_moe]
    slots = {layer: slot for slot, layer in enumerate(moe_layers)}
    if experts_factory is None and moe_layers:
        store, _ = open_expert_store(spec, quant, directory)

        def experts_factory(slot: int) -> CPUExpertLayer:
            return CPUExpertLayer(store, slot)

    int8: dict[int, dict[str, object]] = {}
    for index in range(spec.num_layers):
        path = directory / "dense_int8" / f"layer_{index:03d}.safetensors"
        if path.is_file():
            int8[index] = _int8_matrices(path, matrix_factory)
    skip = {name for index, roles in int8.items() for name in _names(spec, index, roles)}
    lm_path = directory / "dense_int8" / "lm_head.safetensors"
    if lm_path.is_file() and not spec.tie_word_embeddings:
        skip.add(spec.lm_head_name)
    weights = load_weights(ckpt, spec, dtype, device, skip=skip, embed_device="cpu",
                           experts_factory=lambda index, _read: experts_factory(slots[index]))
    for index, roles in int8.items():
        layer = weights.layers[index]
        for role, matrix in roles.items():
            target = layer.attention if role in spec.layers[index].names.attention else layer.mlp
            target[role] = matrix
    if lm_path.is_file():
        weights.lm_head = _int8_matrices(lm_path, matrix_factory)["lm_head"]
    return weights


def _names(spec: ArchSpec, index: int, roles) -> list[str]:
    n = spec.layers[index].names
    return [n.attention.get(role) or n.mlp[role] for role in roles]
