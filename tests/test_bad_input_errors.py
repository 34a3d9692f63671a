"""Bad input is reported with a clear message naming the problem and the fix."""

import json
import shutil

import pytest

import krasis
from krasis.errors import InvalidInputError, ModelLoadError, UnsupportedArchitectureError


@pytest.fixture
def model_copy(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe_mixed")[1]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json.*--model-path"):
        krasis.LLM(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        krasis.LLM(tmp_path / "nope")


def test_unsupported_architecture_lists_supported_ones(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        krasis.LLM(model_copy)


def test_missing_shard_named_in_index(tiny_checkpoint, tmp_path):
    from krasis.synthetic import write_random_checkpoint

    hf, src = tiny_checkpoint("qwen3_moe_mixed")
    cfg = json.loads((src / "config.json").read_text())
    out = write_random_checkpoint(tmp_path / "sharded", cfg, max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shards[1].name}.*missing"):
        krasis.LLM(out)


def test_sharded_checkpoint_loads(tiny_checkpoint, tmp_path):
    from krasis.synthetic import write_random_checkpoint

    _, src = tiny_checkpoint("qwen3_moe_mixed")
    cfg = json.loads((src / "config.json").read_text())
    out = write_random_checkpoint(tmp_path / "sharded", cfg, max_shard_bytes=40_000)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    assert krasis.LLM(out).prompt_logits([1, 2, 3]).shape == (3, cfg["vocab_size"])


def test_truncated_safetensors_file(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="truncated.*re-download"):
        krasis.LLM(model_copy)


def test_tensor_shape_not_matching_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["moe_intermediate_size"] += 8
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has shape .* but config.json implies"):
        krasis.LLM(model_copy)


def test_token_ids_outside_vocabulary(tiny_checkpoint):
    llm = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1])
    with pytest.raises(InvalidInputError, match=r"outside the vocabulary \[0, 320\)"):
        llm.prompt_logits([1, 5000])
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        llm.generate([-1])


def test_prompt_longer_than_context(tiny_checkpoint):
    llm = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1])
    with pytest.raises(InvalidInputError, match="context is 512 tokens"):
        llm.generate([1] * 500, max_new_tokens=20)
