"""The server process's life: the discovery file appears while it runs and goes on SIGTERM; a bad model
directory is a clear error; the model is warmed up before the server answers."""

import json
import os
import subprocess
import sys
import time

import pytest
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


class _WarmableModel:
    """What the server's load step needs of a model, recording warm_up calls."""

    def __init__(self, path):
        self.model_path = path
        self.warmed = 0

    def warm_up(self) -> float:
        self.warmed += 1
        return 0.5


class _FailingWarmUp(_WarmableModel):
    def warm_up(self) -> float:
        raise RuntimeError("out of memory in a capture")


def _serve_until_attached(monkeypatch, tmp_path, model, flags=()):
    """Run the server's ``serve`` with a stand-in for uvicorn's server that returns once the model is attached;
    returns serve's exit status and the model attached."""
    import uvicorn

    from krasis.server import __main__ as server_main

    monkeypatch.setenv("KRASIS_HOME", str(tmp_path))
    attached = []

    class Server:
        def __init__(self, config):
            self.state, self.should_exit = config.app.state.krasis, False

        def run(self):
            deadline = time.monotonic() + 30
            while self.state.llm is None and not self.should_exit and time.monotonic() < deadline:
                time.sleep(0.01)
            attached.append(self.state.llm)

    monkeypatch.setattr(uvicorn, "Server", Server)
    args = server_main.build_parser().parse_args(["--port", "0", "--served-model-name", "m", *flags])
    return server_main.serve(args, lambda: model), attached[0]


@pytest.mark.parametrize("flags,warmed", [([], 1), (["--no-warmup"], 0)])
def test_the_server_warms_the_model_up_before_it_answers_unless_told_not_to(monkeypatch, tmp_path, capsys, flags,
                                                                             warmed):
    model = _WarmableModel(tmp_path)
    assert _serve_until_attached(monkeypatch, tmp_path, model, flags) == (0, model)
    assert model.warmed == warmed
    assert ("warmed up in 0.5 s" in capsys.readouterr().err) == bool(warmed)


def test_a_failed_warm_up_is_reported_and_the_server_serves_all_the_same(monkeypatch, tmp_path, capsys):
    model = _FailingWarmUp(tmp_path)
    assert _serve_until_attached(monkeypatch, tmp_path, model) == (0, model)
    assert "the warm-up generation failed (RuntimeError: out of memory in a capture)" in capsys.readouterr().err
