"""GLM-4 MoE and DeepSeek-V3: the noaux_tc router against transformers' own router modules, chunked prefill and
prefix reuse against a single pass, the correction bias kept in float32, MTP layers ignored, config handling."""

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from measures import random_prompt as prompt
from measures import rel_err
from safetensors.torch import load_file, save_file
from tiny_models import DEEPSEEK_V3, GLM4_MOE

import krasis
from krasis.errors import ModelLoadError
from krasis.models import spec_from_config
from krasis.models.spec import RouterSpec
from krasis.ops.router import route, routing_margin

NAMES = sorted({**GLM4_MOE, **DEEPSEEK_V3})


def _reference_router(family: str, n_experts: int, n_group: int, topk_group: int, top_k: int, norm: bool,
                      scaling: float, hidden: int):
    from transformers import DeepseekV3Config, Glm4MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    cfg_cls, router_cls = {"glm4_moe": (Glm4MoeConfig, Glm4MoeTopkRouter),
                           "deepseek_v3": (DeepseekV3Config, DeepseekV3TopkRouter)}[family]
    cfg = cfg_cls(hidden_size=hidden, n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group,
                  num_experts_per_tok=top_k, norm_topk_prob=norm, routed_scaling_factor=scaling)
    router = router_cls(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.2)
        router.e_score_correction_bias.uniform_(-0.2, 0.2)
    return router


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
@pytest.mark.parametrize("n_experts,n_group,topk_group,top_k,norm,scaling", [
    (64, 8, 4, 8, True, 2.5),   # DeepSeek-V3's proportions (256 experts, 8 groups, best 4, top 8)
    (16, 1, 1, 4, True, 1.0),   # GLM-4.5's (one group)
    (12, 4, 2, 3, False, 1.5),
])
def test_noaux_tc_route_matches_transformers_router(family, n_experts, n_group, topk_group, top_k, norm, scaling):
    hidden = 64
    ref = _reference_router(family, n_experts, n_group, topk_group, top_k, norm, scaling, hidden)
    spec = spec_from_config({
        "architectures": ["Glm4MoeForCausalLM" if family == "glm4_moe" else "DeepseekV3ForCausalLM"],
        "vocab_size": 64, "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 64,
        "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
        "n_routed_experts": n_experts, "moe_intermediate_size": 64, "num_experts_per_tok": top_k,
        "n_group": n_group, "topk_group": topk_group, "norm_topk_prob": norm, "routed_scaling_factor": scaling,
        "first_k_dense_replace": 0}).moe.router
    h = torch.randn(300, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_w, ref_ids = ref(h)
    weights, ids = route(F.linear(h, ref.weight), spec, torch.float32, ref.e_score_correction_bias)
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-7)
    # the bias really steers the choice here (else this test would not see it)
    _, unbiased = route(F.linear(h, ref.weight), spec, torch.float32, torch.zeros(n_experts))
    assert not torch.equal(unbiased.sort(dim=-1).values, ids.sort(dim=-1).values)


def test_noaux_tc_route_needs_the_bias_tensor():
    spec = spec_from_config({"architectures": ["Glm4MoeForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 1, "n_routed_experts": 4,
                             "moe_intermediate_size": 64, "num_experts_per_tok": 2}).moe.router
    with pytest.raises(ValueError, match="router_bias"):
        route(torch.zeros(1, 4), spec, torch.float32)


def test_routing_margin_is_the_gap_where_the_choice_of_groups_or_experts_would_change():
    spec = RouterSpec(top_k=2, scoring="sigmoid", norm_topk_prob=False, group_limited=True, n_group=3,
                      topk_group=2, correction_bias=True, group_score="top2_sum")
    bias = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.0])
    # choice scores (sigmoid + bias) per group of two: {0.9, 0.6}, {0.8, 0.75}, {0.7, 0.6}; groups 1.5, 1.55, 1.3
    scores = torch.tensor([[0.9, 0.6, 0.7, 0.75, 0.7, 0.6]])
    logits = torch.logit(scores)
    # groups: 1.5 kept against 1.3 passed over (0.2); experts of the kept groups: 0.9, 0.8 chosen, 0.75 next (0.05)
    torch.testing.assert_close(routing_margin(logits, spec, bias), torch.tensor([0.05]), atol=1e-6, rtol=0)
    assert route(logits, spec, torch.float32, bias)[1].sort().values.tolist() == [[0, 2]]
    # a third group close behind: its gap is the margin
    near = torch.logit(torch.tensor([[0.9, 0.6, 0.7, 0.75, 0.7, 0.79]]))
    torch.testing.assert_close(routing_margin(near, spec, bias), torch.tensor([0.01]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_in_uneven_pieces_equals_single_pass(tiny_checkpoint, name):
    llm = krasis.LLM(tiny_checkpoint(name)[1], dtype="float32")
    ids = prompt(77, seed=21)
    full = llm.prompt_logits(ids)
    cache, fwd, start, pieces = llm.new_cache(), llm._forward, 0, []
    with torch.inference_mode():
        for size in (5, 30, 1, 17, 24):  # 77 tokens, both MLA forms (absorbed <= 16 tokens, expanded above)
            pieces.append(fwd.logits(fwd(torch.tensor(ids[start:start + size]), cache, start)).float())
            start += size
    assert start == len(ids)
    assert rel_err(torch.cat(pieces), full) < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_prefix_reuse_generates_what_a_fresh_prefill_does(tiny_checkpoint, name):
    llm = krasis.LLM(tiny_checkpoint(name)[1], dtype="float32")
    first = prompt(40, seed=4)
    second = first[:23] + prompt(19, seed=5)
    list(llm.stream(first, max_new_tokens=3, reuse_prefix=True))
    reused = list(llm.stream(second, max_new_tokens=12, reuse_prefix=True))
    assert llm.last_cached_tokens == 23
    assert reused == llm.generate(second, max_new_tokens=12)


@pytest.mark.parametrize("name", ["glm4_moe_qknorm_bias", "deepseek_v3_grouped_qlora"])
def test_correction_bias_stays_float32_in_bfloat16(tiny_checkpoint, name):
    llm = krasis.LLM(tiny_checkpoint(name)[1], dtype="bfloat16")
    moe_layers = [layer for layer in llm._forward.w.layers if layer.experts is not None]
    assert moe_layers and all(layer.mlp["router_bias"].dtype == torch.float32 for layer in moe_layers)
    assert all(layer.mlp["router"].dtype == torch.bfloat16 for layer in moe_layers)


@pytest.mark.parametrize("name", ["glm4_moe_grouped", "deepseek_v3_plain_bias"])
def test_mtp_layer_tensors_are_ignored_with_a_log_line(tiny_checkpoint, tmp_path, caplog, name):
    hf, path = tiny_checkpoint(name)
    model_dir = tmp_path / "with_mtp"
    shutil.copytree(path, model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    n, h = hf.config.num_hidden_layers, hf.config.hidden_size
    mtp = f"model.layers.{n}"  # the shapes of a real next-token-prediction layer's extra tensors
    tensors.update({f"{mtp}.eh_proj.weight": torch.randn(h, 2 * h), f"{mtp}.enorm.weight": torch.ones(h),
                    f"{mtp}.hnorm.weight": torch.ones(h), f"{mtp}.input_layernorm.weight": torch.ones(h),
                    f"{mtp}.mlp.gate.weight": torch.randn(hf.config.n_routed_experts, h),
                    f"{mtp}.shared_head.norm.weight": torch.ones(h)})
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    ids = prompt(9, seed=2)
    with caplog.at_level(logging.INFO, logger="krasis"):
        ours = krasis.LLM(model_dir, dtype="float32").prompt_logits(ids)
    assert f"model.layers.{n} in the checkpoint" in caplog.text
    # same weights; rewritten files can differ in alignment, so the matmuls may round differently
    assert rel_err(ours, krasis.LLM(path, dtype="float32").prompt_logits(ids)) < 1e-5


GLM45_AIR_LIKE = {  # the fields of zai-org/GLM-4.5-Air's config.json (sizes shrunk to the layer count)
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "eos_token_id": [151329, 151336, 151338],
    "first_k_dense_replace": 1, "head_dim": 128, "hidden_size": 4096, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8,
    "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000, "routed_scaling_factor": 1.0, "topk_group": 1,
    "use_qk_norm": False, "vocab_size": 151552}


def test_glm_hub_config_fields():
    spec = spec_from_config(GLM45_AIR_LIKE)
    assert spec.family == "glm4_moe" and spec.rope.dim == 64 and spec.rope.theta == 1e6
    assert not spec.layers[0].is_moe and all(layer.is_moe for layer in spec.layers[1:])
    a = spec.attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.bias) == (96, 8, 128, False, True)
    assert "o_bias" not in spec.layers[1].names.attention and "q_bias" in spec.layers[1].names.attention
    r = spec.moe.router
    assert (r.scoring, r.correction_bias, r.group_score, r.top_k, r.norm_topk_prob) == ("sigmoid", True, "top2_sum",
                                                                                       8, True)
    assert spec.layers[1].names.mlp["router_bias"] == "model.layers.1.mlp.gate.e_score_correction_bias"
    assert spec.moe.shared_intermediate_size == 1408
    # without the field the reference's default applies: half the head is rotated
    no_factor = {k: v for k, v in GLM45_AIR_LIKE.items() if k != "partial_rotary_factor"}
    assert spec_from_config(no_factor).rope.dim == 64


def test_deepseek_v3_hub_config_fields():
    config = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
              "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
              "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
              "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
              "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
              "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
              "first_k_dense_replace": 3, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
              "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000}
    spec = spec_from_config(config)
    assert spec.family == "deepseek_v3" and spec.rope.interleaved and spec.rope.kind == "yarn"
    assert sum(layer.is_moe for layer in spec.layers) == 58
    r = spec.moe.router
    assert (r.n_group, r.topk_group, r.group_limited, r.routed_scaling_factor) == (8, 4, True, 2.5)
    with pytest.raises(ModelLoadError, match="topk_method 'greedy'"):
        spec_from_config({**config, "topk_method": "greedy"})
    with pytest.raises(ModelLoadError, match="scoring_func 'softmax'"):
        spec_from_config({**config, "scoring_func": "softmax"})
