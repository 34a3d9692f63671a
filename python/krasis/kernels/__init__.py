"""GPU kernels for quantised weights: the GPU layout of dense INT8/INT4 matrices (a transpose of the CPU cache's
bytes), routed experts in the expert store's own layout, expert alignment of routed pairs, and the Triton
weight-only MoE GEMM and linear."""

from .expert_layout import (
    ExpertLayout,
    GPUExperts,
    copy_experts,
    empty_experts,
    experts_from_cpu_layout,
    experts_from_layer_bytes,
)
from .gpu_layout import GPUQuantMatrix, dequantize_gpu, quantize_cpu_layout, to_gpu_layout
from .moe_align import ExpertAlignment, align_by_expert, max_padded_pairs
from .quant_moe import GemmConfig, fused_moe, moe_config, quant_linear

__all__ = [
    "ExpertAlignment",
    "ExpertLayout",
    "GPUExperts",
    "GPUQuantMatrix",
    "GemmConfig",
    "align_by_expert",
    "copy_experts",
    "dequantize_gpu",
    "empty_experts",
    "experts_from_cpu_layout",
    "experts_from_layer_bytes",
    "fused_moe",
    "max_padded_pairs",
    "moe_config",
    "quant_linear",
    "quantize_cpu_layout",
    "to_gpu_layout",
]
