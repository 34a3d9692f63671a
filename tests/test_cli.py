"""The krasis command and the server's command line, run as a user runs them (real subprocesses)."""

import os
import subprocess
import sys

from server_process import start_server
from tiny_gguf import gguf_of_checkpoint


def run_krasis(args, home):
    env = dict(os.environ, KRASIS_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "krasis.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_non_interactive_without_model_builds_demo_and_says_weights_are_random(tmp_path):
    r = run_krasis(["--non-interactive", "--prompt", "Hi", "--max-tokens", "5"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stderr and "--model-path" in r.stderr
    assert (tmp_path / "models" / "krasis-demo-qwen3-moe" / "config.json").is_file()
    assert r.stdout.strip()


def test_non_interactive_with_model_path_prints_completion(tiny_checkpoint, tmp_path):
    import krasis

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    r = run_krasis(["--non-interactive", "--model-path", str(path), "--prompt", "Hello", "--max-tokens", "6",
                    "--dtype", "float32"], tmp_path)
    assert r.returncode == 0, r.stderr
    llm = krasis.LLM(path)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True)
    expected = llm.tokenizer.decode(llm.generate(ids, max_new_tokens=6))
    assert r.stdout == expected + "\n"


def test_bad_model_path_is_a_clear_error_not_a_traceback(tmp_path):
    r = run_krasis(["--non-interactive", "--model-path", str(tmp_path)], tmp_path)
    assert r.returncode == 1
    assert "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_krasis_chat_answers_each_line_and_keeps_the_conversation(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    env = dict(os.environ, KRASIS_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "krasis.chat", "--model-path", str(path), "--max-tokens", "4",
                        "--temperature", "0"], input="Hello\nAnd again\n/quit\n", env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(answers) == 2


def test_cpu_expert_bits_flag_runs_the_quantised_path(tiny_checkpoint, tmp_path):
    import krasis

    _, path = tiny_checkpoint("deepseek_v2_lite_like")
    r = run_krasis(["--non-interactive", "--model-path", str(path), "--prompt", "Hi", "--max-tokens", "5",
                    "--dtype", "float32", "--cpu-expert-bits", "4", "--threads", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    llm = krasis.LLM(path, expert_bits=4)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert r.stdout == llm.tokenizer.decode(llm.generate(ids, max_new_tokens=5)) + "\n"


def test_gguf_path_flag_generates_with_the_gguf_experts(tiny_checkpoint, tmp_path):
    import krasis

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    gguf = gguf_of_checkpoint(path, tmp_path / "tiny-Q8_0.gguf")
    r = run_krasis(["--non-interactive", "--model-path", str(path), "--gguf-path", str(gguf), "--prompt", "Hi",
                    "--max-tokens", "5", "--dtype", "float32", "--threads", "1", "-v"], tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert f"from GGUF {gguf}" in r.stderr  # the routed experts came from the GGUF
    llm = krasis.LLM(path, gguf_path=gguf)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert r.stdout == llm.tokenizer.decode(llm.generate(ids, max_new_tokens=5)) + "\n"


def test_gguf_path_that_does_not_exist_is_a_clear_error_not_a_traceback(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    r = run_krasis(["--non-interactive", "--model-path", str(path), "--gguf-path", str(tmp_path / "none.gguf")],
                   tmp_path)
    assert r.returncode == 1
    assert f"krasis: error: GGUF file {tmp_path / 'none.gguf'} does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_server_gguf_path_flag_serves_the_gguf_experts(tiny_checkpoint, tmp_path):
    import httpx

    import krasis

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    gguf = gguf_of_checkpoint(path, tmp_path / "tiny-Q8_0.gguf")
    llm = krasis.LLM(path, gguf_path=gguf)
    ids = llm.tokenizer.encode("Once upon")
    expected = llm.generate(ids, max_new_tokens=6)
    server = start_server(path, tmp_path / "home", "--gguf-path", str(gguf), "--threads", "1")
    try:
        body = {"model": server.model, "prompt": ids, "max_tokens": 6, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    finally:
        server.stop()
    assert answer["choices"][0]["text"] == llm.tokenizer.decode(expected)
    assert answer["usage"]["completion_tokens"] == len(expected)


def test_server_refuses_gguf_with_quantised_experts_before_opening_the_port(tiny_checkpoint, capsys):
    from krasis.server.__main__ import main

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    assert main(["--model-path", str(path), "--gguf-path", "/x/model.gguf", "--cpu-expert-bits", "4"]) == 1
    err = capsys.readouterr().err
    assert "krasis: error: --gguf-path /x/model.gguf was given with --cpu-expert-bits 4" in err
    assert "Leave --cpu-expert-bits at 16" in err and "loading the model" not in err

