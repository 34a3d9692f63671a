"""Running servers announce themselves in ``~/.krasis/servers/<pid>.json`` (url, model, pid, start time) so
clients such as ``krasis-chat`` can find them; files of dead processes are ignored and removed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..paths import krasis_home


def servers_dir() -> Path:
    return krasis_home() / "servers"


def write_server_file(url: str, model: str, pid: int | None = None) -> Path:
    """Write this server's record (atomically: a temporary file renamed into place); returns its path."""
    pid = os.getpid() if pid is None else pid
    directory = servers_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pid}.json"
    tmp = directory / f".{pid}.json.tmp"
    tmp.write_text(json.dumps({"url": url, "model": model, "pid": pid, "started": time.time()}))
    os.replace(tmp, path)
    return path


def remove_server_file(pid: int | None = None) -> None:
    (servers_dir() / f"{os.getpid() if pid is None else pid}.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def running_servers() -> list[dict]:
    """Records of servers whose process is alive, oldest first; stale or unreadable files are removed."""
    directory = servers_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        found.append(record)
    return sorted(found, key=lambda r: r.get("started", 0))
