"""Putting a cached, quantised model on one GPU plus host memory: non-expert weights resident in VRAM; routed
experts memory-mapped from the cache into the expert store the CPU kernels read (decode), whose memory is also
registered for DMA and streamed to VRAM as it is (prefill, the hot subset kept in VRAM, streamed decode); all
sized by the VRAM plan."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _core
from ..cache.loader import load_cached_weights, open_expert_store, open_gpu_expert_store
from ..cache.parts import separate_gpu_experts
from ..cache.quant_config import QuantConfig
from ..checkpoint import Checkpoint
from ..kernels import ExpertLayout, to_gpu_layout
from ..models.spec import ArchSpec, GQASpec
from .gpu_quant import GPUQuantLinear
from .hybrid_moe import HybridExpertLayer, HybridExperts
from .kv_cache import kv_bytes_per_token, linear_state_bytes
from .store_memory import StoreMemory
from .vram_budget import MiB, VramNeeds, VramPlan, plan_vram
from .weights import ModelWeights

log = logging.getLogger("krasis")

# When no budget is given: the GPU's free memory less this much (other processes, the CUDA context growing).
DEFAULT_FREE_MARGIN = 1024 * MiB
# The budget planned with when the hybrid engine runs on the CPU (tests) and none is given.
CPU_EMULATED_BUDGET_MB = 4096
# Share of the memory planned for prefill's activations that holds hot experts between prompts (the rest stays
# free for what decode allocates as the context grows, e.g. the graphs of a longer context).
EXTRA_SHARE = 0.9


@dataclass
class HybridOptions:
    """The user's GPU settings (None: decided by the VRAM plan)."""

    vram_budget_mb: int | None = None
    kv_dtype: str = "fp8"
    kv_cache_mb: int | None = None
    layer_group_size: int | None = None
    hcs: bool = True
    hcs_experts: int | None = None


def activation_bytes(spec: ArchSpec) -> tuple[int, int]:
    """Estimated prefill scratch bytes (per chunk token, per context token) in BF16, peak over a layer's
    steps (attention, dense MLP, shared + routed experts), with a quarter added for allocator slack."""
    h, b = spec.hidden_size, 2
    residual = 6 * h * b  # residual stream, normed input, layer output, and their temporaries
    mlp = max((layer.dense_intermediate_size for layer in spec.layers), default=0) * 3 * b
    moe = 0
    if spec.moe:
        m = spec.moe
        k, i = m.router.top_k, m.intermediate_size
        # per routed pair: gate|up output, activation, down output; plus float32 sums and shared expert
        moe = k * (3 * i + h) * b + k * 16 + h * 4 + m.shared_intermediate_size * 3 * b
    a = spec.attention
    if isinstance(a, GQASpec):
        attn = (a.num_heads * 2 + a.num_kv_heads * 2) * a.head_dim * b
        per_context = 2 * 2 * a.num_kv_heads * a.head_dim * b  # the cache read back (FP8 dequantised) and copies
    else:
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        attn = a.num_heads * (2 * qk + 2 * a.v_head_dim) * b + (a.kv_lora_rank + a.qk_rope_head_dim) * 2 * b
        # expanded keys/values of every context token: kv_b output, concatenated keys, values, dequantised cache
        per_context = (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim) + a.num_heads * qk + a.num_heads *
                       a.v_head_dim + a.kv_lora_rank + a.qk_rope_head_dim) * b
    per_token = residual + max(mlp, moe, attn)
    return per_token * 5 // 4, per_context * 5 // 4


def gpu_matrix(device: torch.device):
    """A cache.loader matrix factory that repacks a CPU-layout matrix into the GPU layout on ``device``."""

    def make(qweight: np.ndarray, scales: np.ndarray, n: int, k: int, bits: int, group: int) -> GPUQuantLinear:
        q = torch.from_numpy(qweight).to(device)
        s = torch.from_numpy(scales).to(device)
        return GPUQuantLinear(to_gpu_layout(q, s, n, k, bits, group))

    return make


def host_experts(spec: ArchSpec, quant: QuantConfig, directory: Path, cpu_store: _core.ExpertStore | None,
                 device: torch.device) -> StoreMemory:
    """The routed experts the GPU copies from: ``cpu_store``, the cache's store the CPU kernels read, where both
    sides use the same format (registered for DMA, no copy); else a store over the cache's GPU expert files (a
    GGUF's experts on the CPU, or another width on the GPU)."""
    if cpu_store is None or separate_gpu_experts(quant):
        cpu_store = open_gpu_expert_store(spec, quant, directory)
    layout = ExpertLayout.from_store(cpu_store.layout(), cpu_store.bits, cpu_store.group_size)
    return StoreMemory(cpu_store, layout, device)


def _budget(device: torch.device, budget_mb: int | None) -> tuple[int, int]:
    """(budget, device total) in bytes. On the CPU (the interpreter test mode) the budget is only planned with."""
    if device.type != "cuda":
        budget = (budget_mb or CPU_EMULATED_BUDGET_MB) * MiB
        log.info("VRAM budget %d MiB, planned only: the hybrid engine runs on the CPU through the Triton "
                 "interpreter (a test mode, slow)", budget // MiB)
        return budget, budget
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_mb is not None:
        budget, why = budget_mb * MiB, "--vram-budget-mb"
        if budget > total:
            log.warning("--vram-budget-mb %d is more than the GPU has (%d MiB); using all of it", budget_mb,
                        total // MiB)
            budget = total
    else:
        free, _ = torch.cuda.mem_get_info(device)
        budget, why = max(free - DEFAULT_FREE_MARGIN, 0), "the GPU's free memory less a 1 GiB margin"
    log.info("VRAM budget %d MiB (%s) on %s", budget // MiB, why, torch.cuda.get_device_name(device))
    return budget, total


def resident_bytes(weights: ModelWeights) -> int:
    """Bytes of the weights placed on the compute device (everything but the host-side embedding)."""
    def size(w) -> int:
        return w.nbytes if isinstance(w, torch.Tensor | GPUQuantLinear) else 0

    total = size(weights.final_norm) + size(weights.lm_head)
    for layer in weights.layers:
        total += size(layer.input_norm) + size(layer.post_attention_norm)
        total += sum(size(w) for w in (*layer.attention.values(), *layer.mlp.values()))
    return total


def load_hybrid(ckpt: Checkpoint, spec: ArchSpec, dtype: torch.dtype, quant: QuantConfig, directory: Path,
                device: torch.device, options: HybridOptions, progress: bool = True, cpu_store=None,
                ) -> tuple[ModelWeights, HybridExperts | None, VramPlan]:
    """Weights on ``device`` within the VRAM budget, the hybrid expert runtime, and the plan that sized it.
    ``cpu_store`` runs decode's CPU experts instead of the cache's (a GGUF's GgufExpertStore, indexed by MoE
    layer like the cache's ExpertStore); the GPU experts still come from the cache."""
    if device.type == "cuda" and device.index is None:
        # Per-device calls below (the allocator's memory fraction) need an index; "cuda" means the current one.
        device = torch.device("cuda", torch.cuda.current_device())
    budget, total = _budget(device, options.vram_budget_mb)
    if cpu_store is not None:
        store, moe = cpu_store, spec.moe is not None
    else:
        store, paths = open_expert_store(spec, quant, directory) if spec.moe else (None, [])
        moe = bool(paths)
    layers: list[HybridExpertLayer] = []

    def experts_factory(slot: int) -> HybridExpertLayer:
        layers.append(HybridExpertLayer(None, slot))  # bound to the runtime once the plan sizes it
        return layers[-1]

    weights = load_cached_weights(ckpt, spec, dtype, quant, directory, device, experts_factory=experts_factory,
                                  matrix_factory=gpu_matrix(device))
    resident = resident_bytes(weights)
    memory = host_experts(spec, quant, directory, store if cpu_store is None else None, device) if moe else None
    host = memory.layers if memory else []
    if device.type == "cuda":
        torch.cuda.empty_cache()
    per_token, per_context = activation_bytes(spec)
    layer_bytes = host[0].nbytes if host else 0
    needs = VramNeeds(resident=resident, layer_experts=layer_bytes,
                      expert=layer_bytes // spec.moe.num_experts if host else 0, moe_layers=len(host),
                      kv_per_token=kv_bytes_per_token(spec, options.kv_dtype, dtype),
                      activation_per_token=per_token, activation_per_context_token=per_context,
                      max_context=spec.max_position_embeddings, sequence_state=linear_state_bytes(spec, dtype))
    kv_bytes = options.kv_cache_mb * MiB if options.kv_cache_mb is not None else None
    plan = plan_vram(budget, needs, options.layer_group_size, kv_bytes, options.hcs, options.hcs_experts)
    if device.type == "cuda":
        # The allocator enforces the cap from here on, so an emulated small card cannot quietly use more.
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    for line in plan.lines():
        log.info("%s", line)
    runtime = None
    if host:
        # a hot cache sized by hand (--hcs-experts) stays that size; otherwise it also holds experts in prefill's
        # buffers between prompts (even when the plan leaves it no slots of its own)
        lend = options.hcs and options.hcs_experts is None
        extra = int(plan.activation_bytes * EXTRA_SHARE) // needs.expert if lend else 0
        runtime = HybridExperts(host, store, plan.layer_group_size, plan.hcs_slots, device, lend_buffers=lend,
                                extra_slots=extra)
        runtime.host_memory = memory  # owns the store ``host`` views
        if device.type == "cuda":
            # decode graphs look up each step's token in the host-side embedding table themselves (page-locked).
            # A private copy first: as loaded, the table may be pages of the checkpoint file's mapping, and on the
            # GPU machine registering those hung the load (a private copy in anonymous memory registers at once, as
            # the expert store's privately mapped, populated pages do); the file's mapping goes when the checkpoint
            # is closed after the load
            weights.embed = weights.embed.clone()
            runtime.embed_registered = memory.register(weights.embed)
            if not runtime.embed_registered:
                log.info("decode: the embedding table could not be page-locked; greedy decode steps run one at a "
                         "time")
        hcs = runtime.hcs
        if len(hcs.lendable):
            log.info("hot-expert cache: %d more experts in prefill's streaming buffers between prompts (decode "
                     "keeps %d + %d of their slots for prefetch and streamed experts; a prompt empties them and "
                     "they are refilled after it)", len(hcs.lendable), runtime.prefetch_slots,
                     runtime.staging_slots)
        if hcs.extra:
            log.info("hot-expert cache: %d more experts (%d allocated now) in the memory prefill's activations use "
                     "while a prompt runs (%.0f%% of it), freed before a prompt streams experts and allocated "
                     "again after it", hcs.extra, int(hcs.usable[hcs.stored:].sum()),
                     100 * EXTRA_SHARE)
        for layer in layers:
            layer.owner = runtime
        shared = memory.store is store
        log.info("routed experts: %d layers x %d INT%d (%.2f GB) in host memory registered for DMA (%s), for "
                 "streaming and the hot cache; decode runs the non-resident ones on the CPU (%s)", len(host),
                 spec.moe.num_experts, host[0].bits, memory.nbytes / 1e9,
                 "the CPU kernels' own store, no copy" if shared else "the cache's GPU expert files",
                 f"INT{store.bits}" if cpu_store is None else "GGUF")
    weights.runtime = runtime
    return weights, runtime, plan
