"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA with per-head q/k RMSNorm, RoPE, softmax top-k router,
dense MLP layers where ``mlp_only_layers`` / ``decoder_sparse_step`` say so."""

from __future__ import annotations

from .config_fields import eos_token_ids, require, rope_spec
from .spec import ArchSpec, GQASpec, LayerSpec, MoESpec, RouterSpec, TensorNames

ARCHITECTURES = ("Qwen3MoeForCausalLM",)


def _layer_names(i: int, is_moe: bool, bias: bool) -> TensorNames:
    p = f"model.layers.{i}"
    attention = {r: f"{p}.self_attn.{r}_proj.weight" for r in ("q", "k", "v", "o")}
    attention.update(q_norm=f"{p}.self_attn.q_norm.weight", k_norm=f"{p}.self_attn.k_norm.weight")
    if bias:
        attention.update({f"{r}_bias": f"{p}.self_attn.{r}_proj.bias" for r in ("q", "k", "v", "o")})
    if not is_moe:
        return TensorNames(
            input_norm=f"{p}.input_layernorm.weight",
            post_attention_norm=f"{p}.post_attention_layernorm.weight",
            attention=attention,
            mlp={r: f"{p}.mlp.{r}_proj.weight" for r in ("gate", "up", "down")},
        )
    return TensorNames(
        input_norm=f"{p}.input_layernorm.weight",
        post_attention_norm=f"{p}.post_attention_layernorm.weight",
        attention=attention,
        mlp={"router": f"{p}.mlp.gate.weight"},
        expert=p + ".mlp.experts.{e}.{proj}_proj.weight",
        fused_gate_up=f"{p}.mlp.experts.gate_up_proj",
        fused_down=f"{p}.mlp.experts.down_proj",
    )


def build_spec(config: dict) -> ArchSpec:
    family = "qwen3_moe"
    hidden = require(config, "hidden_size", family)
    heads = require(config, "num_attention_heads", family)
    head_dim = config.get("head_dim") or hidden // heads
    num_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    mlp_only = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step", 1) or 1
    bias = bool(config.get("attention_bias", False))
    layers = []
    for i in range(require(config, "num_hidden_layers", family)):
        is_moe = i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
        layers.append(LayerSpec(is_moe=is_moe, dense_intermediate_size=config.get("intermediate_size", 0),
                                names=_layer_names(i, is_moe, bias)))
    moe = None
    if num_experts:
        moe = MoESpec(
            num_experts=num_experts,
            intermediate_size=require(config, "moe_intermediate_size", family),
            router=RouterSpec(top_k=require(config, "num_experts_per_tok", family),
                              norm_topk_prob=bool(config.get("norm_topk_prob", False))),
        )
    return ArchSpec(
        family=family,
        vocab_size=require(config, "vocab_size", family),
        hidden_size=hidden,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        attention=GQASpec(num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                          head_dim=head_dim, qk_norm=True, bias=bias, softmax_scale=head_dim**-0.5),
        rope=rope_spec(config, head_dim),
        layers=tuple(layers),
        moe=moe,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings", 32768),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_token_ids(config),
    )
