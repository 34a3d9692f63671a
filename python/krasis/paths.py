"""Where Krasis keeps its files: ``~/.krasis`` unless ``KRASIS_HOME`` says otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def krasis_home() -> Path:
    """The root of Krasis' files (models, caches, saved config)."""
    return Path(os.environ.get("KRASIS_HOME") or Path.home() / ".krasis")


def models_dir() -> Path:
    return krasis_home() / "models"


def cache_dir() -> Path:
    return krasis_home() / "cache"
