"""The parts a cache is made of: one file of CPU routed experts per MoE layer (the Rust ExpertStore layout),
one safetensors file of INT8-quantised dense matrices per layer (plus lm_head) where the config asks, and, for
a GPU engine run whose GPU expert width differs from the CPU one, one file of GPU routed experts per MoE layer
(the same byte layout at the GPU width, which the GPU reads as it is)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save

from .. import _core
from ..checkpoint import Checkpoint
from ..engine.weights import read_expert_tensors
from ..models.shapes import attention_shapes, mlp_shapes
from ..models.spec import ArchSpec, LayerSpec
from .files import write_atomic
from .quant_config import QuantConfig

# Attention roles that may be INT8 (kv_b stays in the compute dtype: MLA's absorbed decode reshapes it).
INT8_ATTENTION_ROLES = ("q", "k", "v", "o", "q_a", "q_b", "kv_a",
                        # Gated DeltaNet's large projections; its small b/a (decay, beta) and conv stay dense
                        "qkvz", "qkv", "z", "out")


def group_for(k: int, preferred: int) -> int:
    """The largest supported group size, at most ``preferred``, that divides the input dimension k."""
    for g in (128, 64, 32):
        if g <= preferred and k % g == 0:
            return g
    raise ValueError(f"input dimension {k} is not a multiple of 32; it cannot be quantised in groups")


def as_kernel_input(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view the Rust quantiser reads: float32, float16, or bfloat16 as uint16 bits."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float16, torch.float32):
        return t.numpy()
    return t.to(torch.float32).numpy()


@dataclass
class Part:
    """One cache file: where it goes, what it holds, how many source bytes it reads, how to make it."""

    rel: str
    kind: str
    layer: int | None
    source_bytes: int
    estimated_size: int
    write: Callable[[Path], str]  # writes the file atomically, returns its sha256


def expert_group(spec: ArchSpec, quant: QuantConfig) -> int:
    return min(group_for(spec.hidden_size, quant.group_size), group_for(spec.moe.intermediate_size, quant.group_size))


def expert_dir(spec: ArchSpec, quant: QuantConfig, side: str = "cpu") -> str:
    """The folder of the routed-expert files for the CPU kernels (``side`` "cpu") or the GPU kernels ("gpu")."""
    bits = quant.cpu_expert_bits if side == "cpu" else quant.gpu_expert_bits
    return f"{side}_experts_int{bits}_g{expert_group(spec, quant)}"


def expert_file(spec: ArchSpec, quant: QuantConfig, layer: int, side: str = "cpu") -> str:
    """The cache-relative path of decoder layer ``layer``'s routed-expert file for ``side`` ("cpu" or "gpu")."""
    return f"{expert_dir(spec, quant, side)}/layer_{layer:03d}.bin"


def separate_gpu_experts(quant: QuantConfig) -> bool:
    """Whether the GPU engine needs expert files of its own (at a width other than the CPU's)."""
    return quant.gpu_expert_bits != quant.cpu_expert_bits


@functools.lru_cache(maxsize=16)
def expert_nbytes(hidden: int, intermediate: int, bits: int, group: int) -> int:
    """Bytes of one routed expert in the ExpertStore layout (asked of a one-expert store once per shape)."""
    return _core.ExpertStore(1, 1, hidden, intermediate, bits, group, numa="off").expert_nbytes


def _expert_part(ckpt: Checkpoint, spec: ArchSpec, quant: QuantConfig, index: int, layer: LayerSpec,
                 side: str) -> Part:
    bits = quant.cpu_expert_bits if side == "cpu" else quant.gpu_expert_bits
    group, n = expert_group(spec, quant), spec.moe.num_experts
    src = 3 * spec.hidden_size * spec.moe.intermediate_size * n * 2

    def write(path: Path) -> str:
        # one layer at a time: peak memory is one layer's quantised experts plus one expert's source tensors
        store = _core.ExpertStore(1, n, spec.hidden_size, spec.moe.intermediate_size, bits, group, numa="off")
        for e in range(n):
            t = read_expert_tensors(ckpt, spec, layer, e)
            store.set_expert(0, e, as_kernel_input(t["gate"]), as_kernel_input(t["up"]), as_kernel_input(t["down"]))
        return write_atomic(path, (memoryview(store.expert_view(0, e)) for e in range(n)))

    return Part(expert_file(spec, quant, index, side), f"{side}_experts", index, src,
                n * expert_nbytes(spec.hidden_size, spec.moe.intermediate_size, bits, group), write)


def int8_roles(spec: ArchSpec, layer: LayerSpec, quant: QuantConfig) -> dict[str, str]:
    """role -> tensor name of a layer's matrices that the config stores in INT8."""
    names: dict[str, str] = {}
    if quant.attention_quant == "int8":
        names.update({r: layer.names.attention[r] for r in attention_shapes(spec, layer) if r in INT8_ATTENTION_ROLES})
    for role in mlp_shapes(spec, layer):
        shared = role.startswith("shared_")
        wanted = quant.shared_expert_quant if shared else quant.dense_mlp_quant
        if role not in ("router", "router_bias", "shared_expert_gate") and wanted == "int8":  # vectors stay dense
            names[role] = layer.names.mlp[role]
    return names


def _dense_part(ckpt: Checkpoint, rel: str, index: int | None, names: dict[str, str], quant: QuantConfig) -> Part:
    shapes = {role: ckpt.shape(name) for role, name in names.items()}
    src = sum(n * k * 2 for n, k in shapes.values())
    est = sum(n * k + n * (k // 32) * 4 for n, k in shapes.values()) + 4096

    def write(path: Path) -> str:
        tensors, meta = {}, {}
        for role, name in names.items():
            n, k = shapes[role]
            group = group_for(k, quant.group_size)
            qweight, scales = _core.quantize(as_kernel_input(ckpt.get(name)), 8, group)
            tensors[f"{role}.qweight"], tensors[f"{role}.scales"] = qweight, scales
            meta[role] = f"{n},{k},8,{group}"
        return write_atomic(path, [save(tensors, metadata=meta)])

    return Part(rel, "dense_int8", index, src, est, write)


def cache_parts(ckpt: Checkpoint, spec: ArchSpec, quant: QuantConfig, gpu_experts: bool = False,
                cpu_experts: bool = True) -> Iterator[Part]:
    """Every part of the cache for ``spec`` and ``quant``, in build order; ``gpu_experts`` adds the GPU engine's
    own expert files where its width differs from the CPU's, or where the CPU experts come from elsewhere
    (``cpu_experts`` False: a GGUF)."""
    gpu = gpu_experts and (separate_gpu_experts(quant) or not cpu_experts)
    for index, layer in enumerate(spec.layers):
        names = int8_roles(spec, layer, quant)
        if names:
            yield _dense_part(ckpt, f"dense_int8/layer_{index:03d}.safetensors", index, names, quant)
        if layer.is_moe:
            if cpu_experts:
                yield _expert_part(ckpt, spec, quant, index, layer, "cpu")
            if gpu:
                yield _expert_part(ckpt, spec, quant, index, layer, "gpu")
    if quant.lm_head_quant == "int8":
        name = spec.embed_name if spec.tie_word_embeddings else spec.lm_head_name
        yield _dense_part(ckpt, "dense_int8/lm_head.safetensors", None, {"lm_head": name}, quant)
