"""Starting a real ``python -m krasis.server`` subprocess on loopback for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen
    url: str
    model: str
    home: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


def start_server(model_path: Path, home: Path, *args: str, command: list[str] | None = None,
                 ready_timeout: float = 180.0) -> RunningServer:
    """Start the server (``python -m krasis.server`` unless ``command`` gives other arguments for python) and
    wait (bounded) until /health says ok."""
    port = free_port()
    env = dict(os.environ, KRASIS_HOME=str(home))
    command = command or ["-m", "krasis.server"]
    proc = subprocess.Popen([sys.executable, *command, "--model-path", str(model_path), "--port",
                             str(port), "--dtype", "float32", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", Path(model_path).resolve().name, home)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the server was not ready within {ready_timeout} s")
