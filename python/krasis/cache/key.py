"""The cache key: a hash of the model's identity (config.json, every safetensors file's name, size and header),
the quantisation config and the cache format version. Any change to one of them means another cache."""

from __future__ import annotations

import hashlib
import json

from ..checkpoint import Checkpoint
from .quant_config import QuantConfig

# Bump when the bytes a cache holds change meaning (layouts, file set); old caches are then never used.
FORMAT_VERSION = 1


def model_identity(ckpt: Checkpoint) -> dict:
    """What identifies a model's weights without reading them: config.json and each file's size and header."""
    files = {}
    for name, header in ckpt.headers().items():
        size = (ckpt.model_dir / name).stat().st_size
        files[name] = {"size": size,
                       "header_sha256": hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()}
    return {"config": ckpt.config, "files": files}


def cache_key(ckpt: Checkpoint, quant: QuantConfig) -> str:
    """A 24-hex-digit key naming the cache directory."""
    ident = {"format_version": FORMAT_VERSION, "model": model_identity(ckpt), "quant": quant.as_dict()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
