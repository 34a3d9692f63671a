"""The krasis command, run as a user runs it (a real subprocess)."""

import os
import subprocess
import sys


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
