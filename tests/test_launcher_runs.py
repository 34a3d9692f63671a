"""The launcher's headless modes: saved config with command-line overrides, --benchmark, --benchmark-suite and
--perplexity, on tiny checkpoints."""

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_gguf import gguf_of_checkpoint

import krasis
from krasis import cli
from krasis.launcher.benchmark import fitting_lengths
from krasis.launcher.config import BY_NAME, OPTIONS, defaults, save_config
from krasis.launcher.discovery import describe
from krasis.launcher.options import apply_config
from krasis.launcher.perplexity import perplexity
from krasis.launcher.suite import benchmark_command, resolve_model, run_suite

TEXT = ("Mixture-of-Experts models route each token to a few experts. The router picks the best scoring ones, "
        "and the rest stay idle, so a huge model reads only a small part of its weights per token.\n")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KRASIS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def resolved(argv):
    args = cli.build_parser().parse_args(argv)
    apply_config(args, cli.load_config())
    return args


def test_no_cuda_graphs_flag_beats_the_saved_config_and_reaches_the_llm_arguments(home):
    from krasis.gpu_options import gpu_kwargs

    save_config(defaults())
    assert gpu_kwargs(resolved(["--non-interactive"]))["cuda_graphs"] is True
    assert gpu_kwargs(resolved(["--non-interactive", "--no-cuda-graphs"]))["cuda_graphs"] is False


def test_hcs_calibrate_without_the_gpu_engine_is_a_clear_error(home, tiny_checkpoint, tmp_path, capsys):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    text = tmp_path / "calibration.txt"
    text.write_text("some text")
    assert cli.main(["--non-interactive", "--model-path", str(path), "--cpu-expert-bits", "4", "--dtype", "float32",
                     "--hcs-calibrate", str(text), "--prompt", "hi"]) == 1
    assert "krasis: error: the hot-expert cache exists only in the GPU engine" in capsys.readouterr().err


def test_command_line_beats_saved_config_which_beats_defaults(home):
    saved = defaults()
    saved.update(cpu_expert_bits=4, gpu_expert_bits=8, attention_quant="int8", kv_dtype="bf16", kv_cache_mb=64,
                 vram_budget_mb=3000, threads=2, host="0.0.0.0", port=9000, num_gpus=1, dtype="float32",
                 model_path="/saved/model", hcs=False, group_size=64)
    save_config(saved)
    args = resolved(["--non-interactive"])
    for o in OPTIONS:
        assert getattr(args, o.name) == saved[o.name], o.name
    args = resolved(["--non-interactive", "--cpu-expert-bits", "8", "--gpu-expert-bits", "4", "--attention-quant",
                     "bf16", "--kv-dtype", "fp8", "--kv-cache-mb", "32", "--vram-budget-mb", "5000", "--threads", "3",
                     "--host", "127.0.0.1", "--port", "9001", "--num-gpus", "2", "--dtype", "bfloat16",
                     "--model-path", "/cli/model", "--hcs-experts", "5", "--group-size", "128"])
    assert (args.cpu_expert_bits, args.gpu_expert_bits, args.attention_quant, args.kv_dtype, args.kv_cache_mb,
            args.vram_budget_mb, args.threads, args.host, args.port, args.num_gpus, args.dtype, args.model_path,
            args.hcs_experts, args.group_size) == (8, 4, "bf16", "fp8", 32, 5000, 3, "127.0.0.1", 9001, 2,
                                                   "bfloat16", "/cli/model", 5, 128)
    assert args.hcs is False  # not overridden: still the saved value
    (home / "config").unlink()
    args = resolved(["--non-interactive"])
    assert all(getattr(args, o.name) == (o.default or None if o.name == "model_path" else o.default)
               for o in OPTIONS)
    assert BY_NAME["cpu_expert_bits"].default == 16  # no config: the unquantised default of old


def test_non_interactive_runs_the_saved_config_with_an_override(home, tiny_checkpoint, capsys):
    _, path = tiny_checkpoint("deepseek_v2_lite_like")
    saved = defaults()
    saved.update(model_path=str(path), dtype="float32", cpu_expert_bits=4, threads=1)
    save_config(saved)
    assert cli.main(["--non-interactive", "--prompt", "Hi", "--max-tokens", "4", "--cpu-expert-bits", "8"]) == 0
    llm = krasis.LLM(path, dtype="float32", expert_bits=8)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert capsys.readouterr().out == llm.tokenizer.decode(llm.generate(ids, max_new_tokens=4)) + "\n"


def test_num_gpus_below_one_is_refused(home, capsys):
    assert cli.main(["--non-interactive", "--num-gpus", "0"]) == 1
    assert "--num-gpus must be at least 1" in capsys.readouterr().err


def test_gguf_path_with_quantised_cpu_experts_is_refused_naming_the_fix(home, capsys):
    assert cli.main(["--non-interactive", "--gguf-path", "/x/model.gguf", "--cpu-expert-bits", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("krasis: error: --gguf-path /x/model.gguf was given with --cpu-expert-bits 4")
    assert "Leave --cpu-expert-bits at 16" in err and "drop --gguf-path" in err


def test_gguf_path_with_quantised_experts_in_the_saved_config_is_refused_naming_the_override(home, capsys):
    saved = defaults()
    saved.update(cpu_expert_bits=8)
    save_config(saved)
    assert cli.main(["--non-interactive", "--gguf-path", "/x/model.gguf"]) == 1
    assert "pass --cpu-expert-bits 16 to override the saved config" in capsys.readouterr().err


def test_saved_gguf_path_runs_the_gguf_experts(home, tiny_checkpoint, tmp_path, capsys, caplog):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    gguf = gguf_of_checkpoint(path, tmp_path / "tiny-Q8_0.gguf")
    saved = defaults()
    saved.update(model_path=str(path), gguf_path=str(gguf), dtype="float32", threads=1)
    save_config(saved)
    caplog.set_level(logging.INFO, logger="krasis")
    assert cli.main(["--non-interactive", "--prompt", "Hi", "--max-tokens", "4"]) == 0
    assert any(f"from GGUF {gguf}" in r.getMessage() for r in caplog.records)
    llm = krasis.LLM(path, dtype="float32", gguf_path=gguf)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert capsys.readouterr().out == llm.tokenizer.decode(llm.generate(ids, max_new_tokens=4)) + "\n"


def test_no_arguments_without_a_terminal_says_how_to_run(home, capsys):
    assert cli.main([]) == 2
    assert "needs a terminal" in capsys.readouterr().err


def test_benchmark_writes_json_and_markdown_record(home, tiny_checkpoint, tmp_path, capsys):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    results = tmp_path / "results"
    assert cli.main(["--non-interactive", "--benchmark", "--model-path", str(path), "--dtype", "float32",
                     "--benchmark-lengths", "32,64,100000", "--benchmark-ttft-tokens", "64",
                     "--benchmark-decode-tokens", "6", "--benchmark-decode-prompts", "2",
                     "--results-dir", str(results)]) == 0
    out = capsys.readouterr()
    assert "prefill 64 tokens (2/2)" in out.err and "decode 6 tokens after prompt 2/2" in out.err
    [json_file], [md_file] = results.glob("*.json"), results.glob("*.md")
    record = json.loads(json_file.read_text())
    assert [p["tokens"] for p in record["prefill"]] == [32, 64] and record["skipped_lengths"] == [100000]
    assert record["ttft"]["tokens"] == 64 and record["ttft"]["seconds"] > 0
    assert record["decode"]["tokens"] == 6 and len(record["decode"]["per_prompt"]) == 2
    assert record["decode"]["tokens_per_second"] > 0 and record["best_prefill"]["tokens_per_second"] > 0
    assert record["settings"]["dtype"] == "float32" and record["model"] == path.name
    assert record["architecture"]["family"] == "qwen3_moe" and "GQA" in record["architecture"]["attention"]
    assert "| time to first token | 64 |" in md_file.read_text() and "| prefill | 32 |" in out.out


@pytest.mark.parametrize("name,family,attention,routing", [
    ("qwen3_moe_mixed", "qwen3_moe", "GQA", "softmax top-"),
    ("deepseek_v2_grouped_qlora", "deepseek_v2", "MLA (latent", "groups"),
    ("qwen3_next_mixed", "qwen3_next", "layers Gated DeltaNet", "softmax top-"),
    ("qwen3_5_moe_vl", "qwen3_5_moe", "layers Gated DeltaNet", "softmax top-"),
    ("glm4_moe_grouped", "glm4_moe", "GQA", "correction bias"),
    ("deepseek_v3_grouped_qlora", "deepseek_v3", "MLA (latent", "correction bias"),
])
def test_model_description_names_each_familys_attention_and_routing(tiny_checkpoint, name, family, attention,
                                                                     routing):
    info = describe(tiny_checkpoint(name)[1])
    assert info.error is None and info.family == family
    assert attention in info.attention and routing in info.routing
    assert info.routed_experts == info.spec.moe.num_experts and info.top_k == info.spec.moe.router.top_k


def test_benchmark_lengths_fit_the_context_or_are_scaled_down():
    assert fitting_lengths([10000, 20000, 35000, 50000], 32768) == ([10000, 20000], [35000, 50000], False)
    run, skipped, scaled = fitting_lengths([10000, 20000, 35000, 50000], 512)
    assert scaled and max(run) == 511 and len(run) == 4


def _models_folder_with(tmp_path, checkpoint):
    """A models folder under tmp_path holding ``checkpoint`` as "tiny"."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(checkpoint)
    return models


def test_suite_two_models_by_two_configs_with_a_missing_model(home, tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    models = _models_folder_with(tmp_path, path)
    suite = tmp_path / "suite.toml"
    suite.write_text("""
timeout_s = 300
[[config]]
name = "bf16"
dtype = "float32"
benchmark_lengths = [16]
decode_tokens = 3
decode_prompts = 1
[[config]]
name = "int4"
cpu_expert_bits = 4
threads = 1
benchmark_lengths = [16]
decode_tokens = 3
decode_prompts = 1
[[model]]
name = "tiny"
[[model]]
name = "not-downloaded"
""")
    rows, summary = run_suite(suite, models_root=models, echo=lambda *_: None)
    assert [(r.model, r.config, r.ok) for r in rows] == [("tiny", "bf16", True), ("tiny", "int4", True),
                                                          ("not-downloaded", "bf16", False),
                                                          ("not-downloaded", "int4", False)]
    assert all("model not found" in r.reason for r in rows[2:])
    assert rows[1].record["settings"]["cpu_expert_bits"] == 4
    table = summary.read_text()
    assert table.count("| tiny |") == 2 and table.count("failed: model not found") == 2
    assert (tmp_path / "suite_logs" / "tiny__int4.log").is_file()


def test_perplexity_is_exp_of_mean_nll_from_prompt_logits(home, tiny_checkpoint, tmp_path, capsys):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    llm = krasis.LLM(path, dtype="float32")
    ids = llm.tokenizer.encode(TEXT)
    assert 50 < len(ids) < 256
    logp = torch.log_softmax(llm.prompt_logits(ids).double(), dim=-1)
    nll = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    result = perplexity(llm, [TEXT], window=256, stride=128)
    assert result.tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-9)
    assert result.bits_per_character == pytest.approx(nll / math.log(2) / len(TEXT), rel=1e-9)
    # a sliding window scores every token once, each with at least window - stride tokens of context
    sliding = perplexity(llm, [TEXT * 3], window=64, stride=32)
    assert sliding.tokens == len(llm.tokenizer.encode(TEXT * 3)) - 1 and math.isfinite(sliding.perplexity)
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text(TEXT)
    assert cli.main(["--perplexity", "--dataset", str(data), "--model-path", str(path), "--dtype", "float32",
                     "--window", "256", "--stride", "128"]) == 0
    assert f"PPL {result.perplexity:.4f}" in capsys.readouterr().out


def test_suite_benchmark_command_passes_the_gguf_path():
    command = benchmark_command("py", Path("/m/tiny"), Path("/m/tiny-Q8_0.gguf"), Path("/r"), {"dtype": "float32"})
    assert command == ["py", "-m", "krasis.cli", "--non-interactive", "--ignore-config", "--benchmark",
                       "--model-path", "/m/tiny", "--gguf-path", "/m/tiny-Q8_0.gguf", "--results-dir", "/r",
                       "--dtype", "float32"]
    assert "--gguf-path" not in benchmark_command("py", Path("/m/tiny"), None, Path("/r"), {})


def test_suite_finds_gguf_name_under_the_models_folder_and_reports_a_missing_one(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    models = tmp_path / "models"
    (models / "ggufs").mkdir(parents=True)
    (models / "tiny").symlink_to(path)
    gguf = models / "ggufs" / "tiny-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model({"name": "tiny", "gguf_name": "tiny-Q8_0.gguf"}, models) == (models / "tiny", gguf, "")
    assert resolve_model({"name": "tiny", "gguf_path": str(gguf)}, models) == (models / "tiny", gguf, "")
    model_dir, found, why = resolve_model({"name": "tiny", "gguf_name": "other.gguf"}, models)
    assert (model_dir, found) == (None, None) and why == f"GGUF file other.gguf not found under {models}"


def test_suite_runs_a_gguf_model_with_its_gguf_experts(home, tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    models = _models_folder_with(tmp_path, path)
    gguf = gguf_of_checkpoint(path, models / "tiny-Q8_0.gguf")
    suite = tmp_path / "suite.toml"
    suite.write_text("""
timeout_s = 300
[[config]]
name = "f32"
dtype = "float32"
threads = 1
benchmark_lengths = [16]
decode_tokens = 3
decode_prompts = 1
[[model]]
name = "tiny"
gguf_name = "tiny-Q8_0.gguf"
""")
    [row], summary = run_suite(suite, models_root=models, python=sys.executable, echo=lambda *_: None)
    assert row.ok, row.reason
    assert row.model == "tiny + tiny-Q8_0.gguf" and row.record["settings"]["gguf_path"] == str(gguf)
    assert f"--gguf-path {gguf}" in row.log.read_text().splitlines()[0]
    assert "| tiny + tiny-Q8_0.gguf | f32 | ok |" in summary.read_text()


def test_suite_gguf_row_with_quantised_experts_fails_with_the_reason(home, tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    gguf = tmp_path / "tiny-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the combination is refused before loading
    suite = tmp_path / "suite.toml"
    suite.write_text(f"""
[[config]]
name = "int4"
cpu_expert_bits = 4
[[model]]
path = "{path}"
gguf_path = "{gguf}"
""")
    [row], _ = run_suite(suite, models_root=tmp_path, echo=lambda *_: None)
    assert not row.ok and row.reason.startswith(f"--gguf-path {gguf} was given with --cpu-expert-bits 4")
