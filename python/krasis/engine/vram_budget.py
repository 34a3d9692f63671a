"""Dividing a VRAM budget between what a hybrid model needs on the GPU: resident weights, the two expert
streaming buffers of prefill, the KV cache, prefill activations (which set the chunk size) and, with what is
left, the hot-expert cache (HCS)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInputError

MiB = 1 << 20
# Kept free for the allocator's rounding and fragmentation, cuBLAS/Triton workspaces and small tensors.
MIN_MARGIN = 384 * MiB
MARGIN_SHARE = 0.04
MIN_CHUNK_TOKENS = 256
MAX_CHUNK_TOKENS = 16384
CHUNK_GRANULE = 256
# KV cache tokens kept when neither --kv-cache-mb nor a shorter model context says otherwise.
DEFAULT_KV_TOKENS = 32768
MIN_KV_TOKENS = 2048
# Share of the memory left after the fixed parts that prefill activations may take (the rest goes to HCS).
ACTIVATION_SHARE = 0.35


@dataclass(frozen=True)
class VramNeeds:
    """What the model asks of the GPU, in bytes."""

    resident: int  # non-expert weights (attention, norms, routers, shared/dense MLPs, lm_head)
    layer_experts: int  # one MoE layer's routed experts (the expert store's layout, each padded to a page)
    expert: int  # one routed expert, likewise
    moe_layers: int
    kv_per_token: int
    activation_per_token: int  # prefill scratch per token of a chunk
    activation_per_context_token: int  # prefill scratch per token of context (attention expansion)
    max_context: int
    sequence_state: int = 0  # per-sequence state of fixed size (linear-attention conv and recurrent states)


@dataclass(frozen=True)
class VramPlan:
    budget: int
    margin: int
    resident: int
    layer_group_size: int
    stream_buffers: int
    kv_tokens: int
    kv_bytes: int
    chunk_tokens: int
    activation_bytes: int
    hcs_slots: int
    hcs_bytes: int
    sequence_state: int = 0

    def lines(self) -> list[str]:
        """What was decided and why, for the log."""
        m = lambda b: f"{b / MiB:,.0f} MiB"  # noqa: E731
        return [
            f"VRAM budget {m(self.budget)}: resident weights {m(self.resident)}, margin {m(self.margin)}",
            f"prefill streams experts {self.layer_group_size} layer(s) at a time through 2 buffers "
            f"({m(self.stream_buffers)}); prompts are prefilled in chunks of {self.chunk_tokens} tokens "
            f"({m(self.activation_bytes)} of activations)",
            f"KV cache {self.kv_tokens} tokens ({m(self.kv_bytes)})"
            + (f", linear-attention state {m(self.sequence_state)}" if self.sequence_state else ""),
            f"hot-expert cache: {self.hcs_slots} experts resident in VRAM ({m(self.hcs_bytes)})",
        ]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_vram(budget: int, needs: VramNeeds, layer_group_size: int | None = None, kv_cache_bytes: int | None = None,
              hcs: bool = True, hcs_max_experts: int | None = None) -> VramPlan:
    """Split ``budget`` bytes; an impossible budget raises InvalidInputError naming the minimum.
    ``hcs_max_experts`` caps the hot-expert cache below what the budget would allow."""
    margin = max(MIN_MARGIN, int(budget * MARGIN_SHARE))
    group = layer_group_size or 1
    if group < 1:
        raise InvalidInputError(f"--layer-group-size must be at least 1, not {group}")
    group = min(group, max(needs.moe_layers, 1))
    buffers = 2 * group * needs.layer_experts if needs.moe_layers else 0
    if kv_cache_bytes is not None:
        kv_tokens = min(kv_cache_bytes // needs.kv_per_token, needs.max_context)
        if kv_tokens < 1:
            raise InvalidInputError(f"--kv-cache-mb {kv_cache_bytes / MiB:.0f} holds no token "
                                    f"(one token takes {needs.kv_per_token} bytes)")
    else:
        kv_tokens = min(DEFAULT_KV_TOKENS, needs.max_context)
    min_kv = min(kv_tokens, MIN_KV_TOKENS)

    def activations(chunk: int, context: int) -> int:
        return chunk * needs.activation_per_token + context * needs.activation_per_context_token

    fixed = needs.resident + margin + buffers + needs.sequence_state
    minimum = fixed + min_kv * needs.kv_per_token + activations(MIN_CHUNK_TOKENS, min_kv)
    if budget < minimum:
        raise InvalidInputError(
            f"a VRAM budget of {budget / MiB:,.0f} MiB cannot hold this model's GPU part: it needs at least "
            f"{minimum / MiB:,.0f} MiB (resident weights {needs.resident / MiB:,.0f}, expert streaming buffers "
            f"{buffers / MiB:,.0f}, margin {margin / MiB:,.0f}, linear-attention state "
            f"{needs.sequence_state / MiB:,.0f}, a minimal KV cache and prefill chunk); raise "
            f"--vram-budget-mb to at least {minimum // MiB + 1}" + (", or lower --layer-group-size" if group > 1
                                                                    else ""))
    free = budget - fixed
    if kv_cache_bytes is None:
        # the default cache may take at most a quarter of what is free; an explicit size is honoured
        kv_tokens = max(min_kv, min(kv_tokens, free // 4 // needs.kv_per_token))
    kv_bytes = kv_tokens * needs.kv_per_token
    if kv_bytes + activations(MIN_CHUNK_TOKENS, kv_tokens) > free:
        raise InvalidInputError(f"a KV cache of {kv_bytes / MiB:,.0f} MiB does not fit the VRAM budget beside the "
                                f"other parts ({free / MiB:,.0f} MiB left); lower --kv-cache-mb or raise "
                                "--vram-budget-mb")
    free -= kv_bytes
    context_scratch = kv_tokens * needs.activation_per_context_token
    room = int((free - context_scratch) * (ACTIVATION_SHARE if hcs else 1.0))
    chunk = room // max(needs.activation_per_token, 1) // CHUNK_GRANULE * CHUNK_GRANULE
    chunk = max(MIN_CHUNK_TOKENS, min(chunk, MAX_CHUNK_TOKENS, max(kv_tokens, MIN_CHUNK_TOKENS)))
    act = activations(chunk, kv_tokens)
    free -= act
    slots = 0
    if hcs and needs.expert:
        slots = max(0, min(free // needs.expert, needs.moe_layers * (needs.layer_experts // needs.expert)))
        if hcs_max_experts is not None:
            slots = min(slots, hcs_max_experts)
    return VramPlan(budget=budget, margin=margin, resident=needs.resident, layer_group_size=group,
                    stream_buffers=buffers, kv_tokens=kv_tokens, kv_bytes=kv_bytes, chunk_tokens=chunk,
                    activation_bytes=act, hcs_slots=slots, hcs_bytes=slots * needs.expert,
                    sequence_state=needs.sequence_state)
