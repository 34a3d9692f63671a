"""Memory estimates from a model's shapes alone (no weights read): system RAM per quantisation, and what the
GPU engine would ask of a VRAM budget, divided by the engine's own planner."""

from __future__ import annotations

import math

from ..models.shapes import attention_shapes, expert_shapes, mlp_shapes
from ..models.spec import ArchSpec

MiB = 1 << 20
PAGE = 4096


def _group_for(k: int, preferred: int) -> int:
    for group in (128, 64, 32):
        if group <= preferred and k % group == 0:
            return group
    return 32


def _int_bytes(n: int, k: int, bits: int, group: int) -> int:
    """Packed weights plus float32 scales of an [n, k] matrix quantised to ``bits``."""
    return n * math.ceil(k * bits / 8) + n * math.ceil(k / _group_for(k, group)) * 4


def expert_bytes(spec: ArchSpec, bits: int, group: int = 128) -> int:
    """One routed expert (gate, up, down) in the cache's layout, page aligned; 16 bits = BF16."""
    shapes = expert_shapes(spec)
    if bits == 16:
        return sum(n * k for n, k in shapes.values()) * 2
    (gn, gk), (dn, dk) = shapes["gate"], shapes["down"]
    total = 2 * _int_bytes(gn, gk, bits, group) + _int_bytes(dn, dk, bits, group)
    return (total + PAGE - 1) // PAGE * PAGE


def routed_expert_params(spec: ArchSpec) -> int:
    if spec.moe is None:
        return 0
    per_expert = sum(n * k for n, k in expert_shapes(spec).values())
    return sum(layer.is_moe for layer in spec.layers) * spec.moe.num_experts * per_expert


def ram_bytes(spec: ArchSpec, total_params: int, bits: int, group: int = 128) -> int:
    """System RAM for the weights: routed experts at ``bits`` (16 = BF16), everything else in BF16 (an upper
    bound: INT8 dense parts take about half)."""
    moe_layers = sum(layer.is_moe for layer in spec.layers)
    experts = moe_layers * spec.moe.num_experts * expert_bytes(spec, bits, group) if spec.moe else 0
    return experts + (total_params - routed_expert_params(spec)) * 2


def _matrix_bytes(n: int, k: int, quant: str, group: int) -> int:
    return _int_bytes(n, k, 8, group) if quant == "int8" else n * k * 2


def resident_bytes(spec: ArchSpec, config: dict) -> int:
    """What the GPU engine keeps in VRAM: attention, norms, routers, shared experts / dense MLPs and lm_head
    (the embedding table stays in host memory)."""
    group = config["group_size"]
    total = spec.hidden_size * 2 + _matrix_bytes(spec.vocab_size, spec.hidden_size, config["lm_head_quant"], group)
    for layer in spec.layers:
        total += 2 * spec.hidden_size * 2
        for role, shape in attention_shapes(spec, layer).items():
            quant = config["attention_quant"] if len(shape) == 2 and role != "kv_b" else "bf16"
            total += _matrix_bytes(*shape, quant, group) if len(shape) == 2 else shape[0] * 2
        for role, shape in mlp_shapes(spec, layer).items():
            if role == "router":
                total += shape[0] * shape[1] * 2
                continue
            quant = config["shared_expert_quant"] if role.startswith("shared") else config["dense_mlp_quant"]
            total += _matrix_bytes(*shape, quant, group)
    return total


def vram_needs(spec: ArchSpec, config: dict):
    """The engine's VramNeeds estimated from the shapes and the chosen quantisation."""
    import torch

    from ..engine.hybrid_load import activation_bytes
    from ..engine.kv_cache import kv_bytes_per_token, linear_state_bytes
    from ..engine.vram_budget import VramNeeds

    # streaming buffers and hot-expert slots hold the GPU engine's copy, at the GPU width
    expert = expert_bytes(spec, config["gpu_expert_bits"], config["group_size"]) if spec.moe else 0
    moe_layers = sum(layer.is_moe for layer in spec.layers) if spec.moe else 0
    per_token, per_context = activation_bytes(spec)
    dtype = torch.float32 if config["dtype"] == "float32" else torch.bfloat16
    return VramNeeds(resident=resident_bytes(spec, config), layer_experts=expert * (spec.moe.num_experts if spec.moe
                                                                                    else 0),
                     expert=expert, moe_layers=moe_layers,
                     kv_per_token=kv_bytes_per_token(spec, config["kv_dtype"] or "fp8", dtype),
                     activation_per_token=per_token, activation_per_context_token=per_context,
                     max_context=spec.max_position_embeddings, sequence_state=linear_state_bytes(spec, dtype))


def plan_for(spec: ArchSpec, config: dict, budget_mb: int):
    """The VRAM plan the engine would make for ``budget_mb``; InvalidInputError (with the reason) when it cannot."""
    from ..engine.vram_budget import plan_vram

    kv = config["kv_cache_mb"] * MiB if config["kv_cache_mb"] is not None else None
    return plan_vram(budget_mb * MiB, vram_needs(spec, config), config["layer_group_size"], kv, config["hcs"],
                     config["hcs_experts"])
