"""``krasis-chat`` as a client of a running server: through a pseudo-terminal, through discovery, and with a
server that is not there."""

import os
import pty
import select
import subprocess
import sys
import time

from server_process import free_port


def read_until(fd, marker: bytes, timeout: float = 120.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{marker!r} did not appear; got {buf!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        buf += data
    return buf


def test_krasis_chat_streams_answers_from_a_server_in_a_terminal(krasis_server, tmp_path):
    port = krasis_server.url.rsplit(":", 1)[1]
    master, slave = pty.openpty()
    env = dict(os.environ, KRASIS_HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "krasis.chat", "--port", port, "--temperature", "0",
                             "--max-tokens", "4"], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    try:
        assert krasis_server.model.encode() in read_until(master, b"> ")
        os.write(master, b"Hello\n")
        assert b"tok/s" in read_until(master, b" s]")
        os.write(master, b"/system Be brief.\n")
        assert b"system message set" in read_until(master, b"set)")
        os.write(master, b"/new\n")
        assert b"new conversation" in read_until(master, b"conversation)")
        os.write(master, b"Again\n")
        out = read_until(master, b" s]")
        assert b"tokens" in out and b"Traceback" not in out
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)


def test_krasis_chat_finds_a_running_server_through_discovery(krasis_server):
    env = dict(os.environ, KRASIS_HOME=str(krasis_server.home))
    r = subprocess.run([sys.executable, "-m", "krasis.chat", "--temperature", "0", "--max-tokens", "3"],
                       input="Hi\n/exit\n", env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"Chatting with {krasis_server.model}" in r.stderr and "tok/s" in r.stderr


def test_krasis_chat_reports_a_missing_server_without_a_traceback(tmp_path):
    env = dict(os.environ, KRASIS_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "krasis.chat", "--port", str(free_port())], input="Hi\n", env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "cannot reach" in r.stderr and "Traceback" not in r.stderr
