"""Checkpoints as users have them: older config styles, BF16/FP16 weights, EOS ids in generation_config.json."""

import json
import shutil

import pytest
import torch
from measures import random_prompt, rel_err, rms_rel_err
from safetensors.torch import load_file, save_file

import krasis


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst




@pytest.mark.parametrize("name", ["qwen3_moe_odd_yarn", "deepseek_v2_lite_like"])
def test_legacy_rope_theta_and_rope_scaling_equal_rope_parameters(tiny_checkpoint, tmp_path, name):
    src = tiny_checkpoint(name)[1]
    legacy = copy_model(src, tmp_path / "legacy")
    cfg = json.loads((legacy / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **params}
    (legacy / "config.json").write_text(json.dumps(cfg))
    ids = random_prompt(16, 2)
    assert torch.equal(krasis.LLM(legacy).prompt_logits(ids), krasis.LLM(src).prompt_logits(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_and_match_float32_weights(tiny_checkpoint, tmp_path, dtype):
    src = tiny_checkpoint("deepseek_v2_grouped_qlora")[1]
    half = copy_model(src, tmp_path / "half")
    tensors = {k: v.to(dtype) for k, v in load_file(str(half / "model.safetensors")).items()}
    save_file(tensors, str(half / "model.safetensors"), metadata={"format": "pt"})
    rounded = copy_model(src, tmp_path / "rounded")  # the same rounded weights, stored as float32
    save_file({k: v.float() for k, v in tensors.items()}, str(rounded / "model.safetensors"))
    ids = random_prompt(16, 2)
    ours, ref = krasis.LLM(half).prompt_logits(ids), krasis.LLM(rounded).prompt_logits(ids)
    assert rel_err(ours, ref) < 1e-5  # equal up to float32 summation order


def test_eos_ids_from_generation_config_stop_generation(tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint("qwen3_moe_mixed")[1], tmp_path / "m")
    free = krasis.LLM(model)
    free.eos_token_ids = set()
    tokens = free.generate(random_prompt(16, 2), max_new_tokens=10)
    stop = tokens[3]
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 1]}))
    llm = krasis.LLM(model)
    assert stop in llm.eos_token_ids
    assert llm.generate(random_prompt(16, 2), max_new_tokens=10) == tokens[: tokens.index(stop) + 1]


def test_int8_attention_option_runs_attention_through_the_rust_kernels(tiny_checkpoint):
    from krasis.cache import QuantConfig
    from krasis.engine.cpu_quant import CPUQuantLinear

    path = tiny_checkpoint("qwen3_moe_mixed")[1]
    llm = krasis.LLM(path, expert_bits=8, quant=QuantConfig(attention_quant="int8"), progress=False)
    assert isinstance(llm._forward.w.layers[0].attention["q"], CPUQuantLinear)
    ref = krasis.LLM(path).prompt_logits(random_prompt(16, 2))
    ours = llm.prompt_logits(random_prompt(16, 2))
    assert rms_rel_err(ours, ref) < 0.08
