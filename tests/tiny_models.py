"""Tiny random checkpoints of real architectures, built with transformers' own config and model classes and
saved with save_pretrained, so tensor names and shapes are the real ones."""

from __future__ import annotations

from pathlib import Path

import torch

from krasis.synthetic import write_tokenizer

VOCAB = 320

QWEN3_MOE = {
    # GQA 4/2, a dense layer between MoE layers, normalised top-k
    "qwen3_moe_mixed": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=True),
    # odd head counts (3 heads, 1 KV head), sparse step 2, unnormalised top-k, YaRN in the legacy rope_scaling style
    "qwen3_moe_odd_yarn": dict(hidden_size=192, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=3, num_key_value_heads=1, head_dim=24, num_experts=6,
                               num_experts_per_tok=3, decoder_sparse_step=2, norm_topk_prob=False,
                               rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64}),
}

DEEPSEEK_V2 = {
    # no q LoRA, greedy routing, a dense first layer, two shared experts, YaRN with mscale (V2-Lite style)
    "deepseek_v2_lite_like": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                                  num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, topk_method="greedy",
                                  n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                   "original_max_position_embeddings": 64, "beta_fast": 32,
                                                   "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # q LoRA, group-limited routing, scaling factor, odd head count, plain RoPE, one shared expert
    "deepseek_v2_grouped_qlora": dict(hidden_size=192, intermediate_size=128, moe_intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
                                      n_routed_experts=12, n_shared_experts=1, num_experts_per_tok=4,
                                      first_k_dense_replace=0, kv_lora_rank=24, q_lora_rank=40, qk_rope_head_dim=8,
                                      qk_nope_head_dim=12, v_head_dim=16, topk_method="group_limited_greedy",
                                      n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=False),
}

ALL = {**{k: ("qwen3_moe", v) for k, v in QWEN3_MOE.items()}, **{k: ("deepseek_v2", v) for k, v in DEEPSEEK_V2.items()}}


def build_hf_model(family: str, overrides: dict, seed: int = 0):
    """A transformers model (float32, eval mode) with weights large enough for peaked routing and logits."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg_cls, model_cls = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
                          "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM)}[family]
    specials = {"eos_token_id": VOCAB - 3, "bos_token_id": None, "pad_token_id": None}
    cfg = cfg_cls(vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  initializer_range=0.1, **specials, **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a missed norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def save_tiny(model, out: Path) -> Path:
    """save_pretrained plus Krasis' byte-level tokenizer (its <|im_end|> is the config's EOS id)."""
    model.save_pretrained(out)
    specials = write_tokenizer(out, VOCAB)
    assert specials["<|im_end|>"] == model.config.eos_token_id
    return out
