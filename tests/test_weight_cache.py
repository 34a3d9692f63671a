"""The weight cache: built once, loaded without rebuilding, never used when damaged, resumed after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from measures import random_prompt

import krasis
from krasis.cache import QuantConfig, ensure_cache
from krasis.cache.files import CacheError, check_free_space
from krasis.cache.key import cache_key
from krasis.checkpoint import Checkpoint
from krasis.models import spec_from_config


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KRASIS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def parts_of(directory: Path) -> dict[str, float]:
    """Each finished cache file -> its modification time."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")
            if p.is_file() and p.suffix in (".bin", ".safetensors")}


def content(path: Path):
    """A part's meaning: raw bytes for expert files; tensors and metadata for safetensors files (whose header
    order is not fixed)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


def build(path, bits=4, verify=False, gpu_bits=None, gpu_experts=False):
    ckpt = Checkpoint(path)
    spec = spec_from_config(ckpt.config)
    quant = QuantConfig(cpu_expert_bits=bits, gpu_expert_bits=gpu_bits or bits)
    return ensure_cache(ckpt, spec, quant, verify=verify, progress=False, gpu_experts=gpu_experts)




def test_first_load_builds_every_part_and_writes_the_manifest_last(tiny_checkpoint, home):
    path = tiny_checkpoint("deepseek_v2_lite_like")[1]
    directory, manifest = build(path)
    assert (directory / "manifest.json").is_file()
    kinds = sorted({f["kind"] for f in manifest["files"].values()})
    assert kinds == ["cpu_experts", "dense_int8"]
    for rel, record in manifest["files"].items():
        assert (directory / rel).stat().st_size == record["size"]
    assert not list(directory.rglob("*.tmp"))


def test_second_load_builds_nothing(tiny_checkpoint, home):
    path = tiny_checkpoint("qwen3_moe_mixed")[1]
    directory, _ = build(path)
    before = parts_of(directory)
    directory2, _ = build(path)
    assert directory2 == directory and parts_of(directory) == before


def test_gpu_experts_of_another_width_are_built_only_when_a_gpu_run_needs_them(tiny_checkpoint, home):
    path = tiny_checkpoint("deepseek_v2_lite_like")[1]
    directory, manifest = build(path, bits=4, gpu_bits=8)
    assert {f["kind"] for f in manifest["files"].values()} == {"cpu_experts", "dense_int8"}
    cpu_only = parts_of(directory)
    directory2, manifest = build(path, bits=4, gpu_bits=8, gpu_experts=True)
    added = set(parts_of(directory)) - set(cpu_only)
    assert directory2 == directory and added and all(rel.startswith("gpu_experts_int8_") for rel in added)
    assert {rel for rel, f in manifest["files"].items() if f["kind"] == "gpu_experts"} == added
    assert {rel: parts_of(directory)[rel] for rel in cpu_only} == cpu_only  # nothing else was rebuilt


def test_a_cpu_run_keeps_the_gpu_experts_an_earlier_run_built(tiny_checkpoint, home):
    path = tiny_checkpoint("qwen3_moe_mixed")[1]
    directory, _ = build(path, bits=4, gpu_bits=8, gpu_experts=True)
    before = parts_of(directory)
    _, manifest = build(path, bits=4)  # same cache (the GPU width is not in the key), no GPU experts wanted
    assert parts_of(directory) == before
    assert any(f["kind"] == "gpu_experts" for f in manifest["files"].values())
    _, manifest = build(path, bits=4, gpu_bits=8, gpu_experts=True)
    assert parts_of(directory) == before


def test_cached_model_gives_the_same_logits_as_the_first_load(tiny_checkpoint, home):
    path = tiny_checkpoint("deepseek_v2_grouped_qlora")[1]
    first = krasis.LLM(path, expert_bits=4, progress=False).prompt_logits(random_prompt(12, 1))
    again = krasis.LLM(path, expert_bits=4, progress=False).prompt_logits(random_prompt(12, 1))
    assert torch.equal(first, again)


@pytest.mark.parametrize("kind", ["cpu_experts", "dense_int8"])
def test_truncated_part_is_reported_and_rebuilt(tiny_checkpoint, home, kind, caplog):
    path = tiny_checkpoint("deepseek_v2_lite_like")[1]
    directory, manifest = build(path)
    rel = next(r for r, f in manifest["files"].items() if f["kind"] == kind)
    data, meaning = (directory / rel).read_bytes(), content(directory / rel)
    (directory / rel).write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="krasis"):
        build(path)
    assert f"{rel} has {len(data) // 2} bytes" in caplog.text
    assert content(directory / rel) == meaning


@pytest.mark.parametrize("kind", ["cpu_experts", "dense_int8"])
def test_corrupted_part_is_caught_by_verify_and_rebuilt(tiny_checkpoint, home, kind, caplog):
    path = tiny_checkpoint("deepseek_v2_lite_like")[1]
    directory, manifest = build(path)
    rel = next(r for r, f in manifest["files"].items() if f["kind"] == kind)
    data = bytearray((directory / rel).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (directory / rel).write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="krasis"):
        build(path, verify=True)
    assert "does not match its checksum" in caplog.text
    assert (directory / rel).read_bytes() != bytes(data)


def test_missing_part_is_rebuilt(tiny_checkpoint, home):
    path = tiny_checkpoint("qwen3_moe_mixed")[1]
    directory, manifest = build(path)
    rel = next(iter(manifest["files"]))
    (directory / rel).unlink()
    build(path)
    assert (directory / rel).is_file()


def test_corrupt_manifest_is_rebuilt_from_checked_parts(tiny_checkpoint, home):
    path = tiny_checkpoint("qwen3_moe_mixed")[1]
    directory, manifest = build(path)
    (directory / "manifest.json").write_text("{not json")
    before = parts_of(directory)
    _, again = build(path)
    assert again["files"] == manifest["files"] and parts_of(directory) == before


def test_changed_model_file_changes_the_key(tiny_checkpoint, tmp_path):
    import shutil

    src = tiny_checkpoint("qwen3_moe_mixed")[1]
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    key = cache_key(Checkpoint(dst), QuantConfig())
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (dst / "config.json").write_text(json.dumps(cfg))
    assert cache_key(Checkpoint(dst), QuantConfig()) != key
    assert cache_key(Checkpoint(src), QuantConfig(cpu_expert_bits=8)) != cache_key(Checkpoint(src), QuantConfig())


def test_not_enough_disk_space_is_refused_early_with_the_size_needed(tmp_path):
    with pytest.raises(CacheError, match=r"needs 5.00 GB but .* has only 1.00 GB free"):
        check_free_space(tmp_path, 5_000_000_000, free_bytes=lambda _: 1_000_000_000)


def test_interrupted_build_resumes_without_redoing_finished_layers(tmp_path):
    from krasis.synthetic import write_random_checkpoint, write_tokenizer

    model = tmp_path / "many_layers"
    config = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 320, "hidden_size": 256,
              "intermediate_size": 256, "moe_intermediate_size": 256, "num_hidden_layers": 24,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 32,
              "num_experts_per_tok": 4, "max_position_embeddings": 512}
    write_random_checkpoint(model, config)
    write_tokenizer(model, 320)
    env = dict(os.environ, KRASIS_HOME=str(tmp_path / "home"))
    code = ("import krasis.cache as c, krasis.checkpoint as k, krasis.models as m, sys; ck = k.Checkpoint(sys.argv[1]);"
            "c.ensure_cache(ck, m.spec_from_config(ck.config), c.QuantConfig(), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(model)], env=env)
    cache_root = tmp_path / "home" / "cache"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache_root.rglob("layer_*.bin.done"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (directory,) = cache_root.iterdir()
    assert not (directory / "manifest.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in directory.rglob("layer_*.bin")
                if Path(str(p) + ".done").exists()}
    assert 3 <= len(finished) < 24
    subprocess.run([sys.executable, "-c", code, str(model)], env=env, check=True)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sum(f["kind"] == "cpu_experts" for f in manifest["files"].values()) == 24
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())


def test_build_peak_memory_stays_near_one_layer_whatever_the_model_size(tmp_path, home):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import cache_build

    model = cache_build.write_model(tmp_path / "m", layers=16, hidden=256, inter=256, experts=32, top_k=4)
    r = cache_build.measure(model)
    layer = r["one_layer_expert_source_bytes"]
    assert r["expert_source_bytes"] == 16 * layer
    assert r["peak_extra_anon_bytes"] < 3 * layer + (32 << 20)


def test_disk_full_while_writing_is_a_clear_error_and_leaves_no_finished_looking_part(tmp_path):
    import errno

    from krasis.cache.files import write_atomic

    def chunks():
        yield b"x" * 100
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "part.bin"
    with pytest.raises(CacheError, match="disk is full while writing .*part.bin.*KRASIS_HOME"):
        write_atomic(target, chunks())
    assert list(tmp_path.iterdir()) == []


def test_changed_weight_file_changes_the_key(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("qwen3_moe_mixed")[1]
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    key = cache_key(Checkpoint(dst), QuantConfig())
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.bfloat16)
    save_file(tensors, str(dst / "model.safetensors"))
    assert cache_key(Checkpoint(dst), QuantConfig()) != key
