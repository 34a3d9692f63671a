"""What an architecture adapter produces: a plain description of a model's shapes, attention, routing and
tensor names. The engine reads this; adapters never run anything."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding over the first ``dim`` channels of each rotated head slice.

    kind: "default" | "linear" | "yarn". ``interleaved`` rotates channel pairs (2i, 2i+1) (DeepSeek's
    layout); otherwise halves (i, i + dim/2) are rotated (Llama/Qwen "rotate_half").
    """

    dim: int
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleaved: bool = False


@dataclass(frozen=True)
class GQASpec:
    """Grouped-query attention (Qwen3-style: optional per-head q/k RMSNorm)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    bias: bool
    softmax_scale: float
    output_gate: bool = False  # q_proj also yields a per-head gate; the output is multiplied by sigmoid(gate)


@dataclass(frozen=True)
class LinearAttentionSpec:
    """Gated DeltaNet (Qwen3-Next / Qwen3.5 linear-attention layers): a causal depthwise conv1d (kernel
    ``conv_kernel``) over q/k/v, the gated delta rule with per-value-head decay and beta, and a gated RMSNorm.
    Each query/key head serves ``num_v_heads // num_k_heads`` consecutive value heads. ``fused_projections``:
    q/k/v/z in one matrix grouped per key head, and b/a in another (Qwen3-Next); otherwise separate q|k|v, z,
    b and a matrices (Qwen3.5)."""

    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int
    fused_projections: bool

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek multi-head latent attention; the KV cache holds the latent (kv_lora_rank) plus the rope key."""

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    bias: bool
    softmax_scale: float


@dataclass(frozen=True)
class RouterSpec:
    """How a token picks its experts.

    scoring: "softmax" (probabilities over all experts) or "sigmoid". With n_group > 1 and
    ``group_limited``, only experts in the best ``topk_group`` groups (by their best expert) are eligible.
    ``float32_logits`` computes the router in float32 whatever the model dtype (DeepSeek does).
    ``correction_bias`` (DeepSeek-V3 / GLM-4 MoE "noaux_tc"): a per-expert float32 bias from the checkpoint
    (mlp role "router_bias") is added to the scores to choose the experts (and their groups) only; the routing
    weights are the uncorrected scores. ``group_score``: how a group is ranked, "max" (its best expert,
    DeepSeek-V2) or "top2_sum" (the sum of its two best bias-corrected scores, noaux_tc).
    """

    top_k: int
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    group_limited: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    float32_logits: bool = False
    correction_bias: bool = False
    group_score: str = "max"


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    intermediate_size: int
    router: RouterSpec
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(x @ gate^T), gate [1, H]


@dataclass(frozen=True)
class TensorNames:
    """Checkpoint tensor names of one decoder layer, keyed by role.

    attention roles: GQA "q", "k", "v", "o", "q_norm", "k_norm" (+ "q_bias", "k_bias", "v_bias");
    MLA "q" or ("q_a", "q_a_norm", "q_b"), "kv_a", "kv_a_norm", "kv_b", "o".
    linear-attention roles: "qkvz" and "ba" (fused) or "qkv", "z", "b", "a"; "conv", "dt_bias", "A_log", "norm",
    "out".
    mlp roles: dense "gate", "up", "down"; MoE "router", "shared_gate", "shared_up", "shared_down",
    "shared_expert_gate", "router_bias" (the noaux_tc correction bias, 1-D, kept in float32).
    Routed experts come from ``expert`` (per-expert tensors) or ``fused_experts`` (3-D tensors).
    """

    input_norm: str
    post_attention_norm: str
    attention: dict[str, str]
    mlp: dict[str, str]
    expert: str | None = None  # format string with {e} and {proj} in ("gate", "up", "down")
    fused_gate_up: str | None = None
    fused_down: str | None = None


@dataclass(frozen=True)
class LayerSpec:
    is_moe: bool
    dense_intermediate_size: int
    names: TensorNames
    mixer: str = "attention"  # "attention" (ArchSpec.attention, a KV cache) or "linear_attention" (recurrent state)


@dataclass(frozen=True)
class ArchSpec:
    """Everything the engine needs to know about a model."""

    family: str
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float
    attention: GQASpec | MLASpec
    rope: RopeSpec
    layers: tuple[LayerSpec, ...]
    moe: MoESpec | None
    embed_name: str = "model.embed_tokens.weight"
    final_norm_name: str = "model.norm.weight"
    lm_head_name: str = "lm_head.weight"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    linear_attention: LinearAttentionSpec | None = None  # the layers whose mixer is "linear_attention"
    norm_weight_offset: float = 0.0  # 1.0 for zero-centred RMSNorm weights: x * (1 + w) (Qwen3-Next)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def attention_summary(spec: ArchSpec) -> str:
    """The attention of a model in a few words, e.g. "MLA (latent 512, 16 heads)" or "GQA 16/2 heads, 36 of 48
    layers Gated DeltaNet"."""
    a = spec.attention
    if isinstance(a, MLASpec):
        text = f"MLA (latent {a.kv_lora_rank}, {a.num_heads} heads)"
    else:
        text = f"GQA {a.num_heads}/{a.num_kv_heads} heads" + (", output gate" if a.output_gate else "")
    linear = sum(layer.mixer == "linear_attention" for layer in spec.layers)
    if linear:
        text += f", {linear} of {spec.num_layers} layers Gated DeltaNet"
    return text


def routing_summary(spec: ArchSpec) -> str:
    """How tokens choose experts in a few words ("" for a dense model), e.g. "sigmoid top-8 of 256, 8 groups,
    correction bias"."""
    if spec.moe is None:
        return ""
    r = spec.moe.router
    parts = [f"{r.scoring} top-{r.top_k} of {spec.moe.num_experts}"]
    if r.group_limited and r.n_group > 1:
        parts.append(f"best {r.topk_group} of {r.n_group} groups")
    if r.correction_bias:
        parts.append("correction bias")
    dense = sum(not layer.is_moe for layer in spec.layers)
    if dense:
        parts.append(f"{dense} dense layer{'s' if dense > 1 else ''}")
    return ", ".join(parts)
