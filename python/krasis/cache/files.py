"""Writing cache files so that nothing half-written is ever used: a temporary name, fsync, rename; a checksum
sidecar beside every finished part; a clear error when the disk is full."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import KrasisError

CHUNK = 16 << 20


class CacheError(KrasisError):
    """The cache cannot be built or used (disk full, unwritable directory, ...)."""


def _disk_full(path: Path, e: OSError) -> CacheError:
    free = shutil.disk_usage(path.parent).free
    return CacheError(f"the disk is full while writing {path} ({free / 1e9:.2f} GB free): free some space or point "
                      "KRASIS_HOME at a larger disk, then run again (finished parts are kept)")


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write ``chunks`` to ``path`` via a temporary file and an atomic rename; return the sha256 hex digest.
    On any failure the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise _disk_full(path, e) from e
        raise CacheError(f"cannot write {path}: {e}") from e
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, [json.dumps(data, indent=1, sort_keys=True).encode()])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_free_space(directory: Path, needed: int, free_bytes: Callable[[Path], int] | None = None) -> None:
    """Refuse early when ``directory``'s disk has less than ``needed`` bytes (plus 1% margin) free."""
    directory.mkdir(parents=True, exist_ok=True)
    free = free_bytes(directory) if free_bytes else shutil.disk_usage(directory).free
    if free < needed * 1.01:
        raise CacheError(f"building the cache needs {needed / 1e9:.2f} GB but {directory} has only "
                         f"{free / 1e9:.2f} GB free: free some space or point KRASIS_HOME at a larger disk")
