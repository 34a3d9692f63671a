"""The server process's life: the discovery file appears while it runs and goes on SIGTERM; a bad model
directory is a clear error."""

import json
import os
import subprocess
import sys

from server_process import start_server


def test_discovery_file_appears_while_serving_and_goes_on_sigterm(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint("qwen3_moe_mixed")
    server = start_server(path, tmp_path)
    record_path = tmp_path / "servers" / f"{server.proc.pid}.json"
    try:
        record = json.loads(record_path.read_text())
        assert record["url"] == server.url and record["pid"] == server.proc.pid
        assert record["model"] == server.model and record["started"] > 0
    finally:
        server.stop()  # SIGTERM
    assert not record_path.exists()


def test_bad_model_directory_exits_1_with_a_clear_message(tmp_path):
    env = dict(os.environ, KRASIS_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "krasis.server", "--model-path", str(tmp_path), "--port", "0"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "no config.json" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "servers").glob("*.json"))


def test_krasis_serve_flag_serves_the_loaded_model(tiny_checkpoint, tmp_path):
    import httpx

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    server = start_server(path, tmp_path, command=["-m", "krasis.cli", "--non-interactive", "--serve"])
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [server.model]
    finally:
        server.stop()


def test_sigterm_during_an_open_stream_exits_promptly(tiny_checkpoint, tmp_path):
    import time

    import httpx

    _, path = tiny_checkpoint("qwen3_moe_mixed")
    server = start_server(path, tmp_path)
    try:
        body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
            started = time.monotonic()
            server.proc.terminate()
            server.proc.wait(timeout=30)
        assert time.monotonic() - started < 20
    finally:
        server.stop()
    assert not (tmp_path / "servers" / f"{server.proc.pid}.json").exists()
