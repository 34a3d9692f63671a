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


def key_quant(quant: QuantConfig) -> dict:
    """The quantisation settings that decide what a cache directory holds."""
    return {k: v for k, v in quant.as_dict().items() if k != "gpu_expert_bits"}


def cache_key(ckpt: Checkpoint, quant: QuantConfig, cpu_experts_from: dict | None = None) -> str:
    """A 24-hex-digit key naming the cache directory. The GPU expert width is not part of it: a cache holds the
    GPU engine's expert files of each width a run asked for, in folders named by the width. ``cpu_experts_from``
    identifies a GGUF the CPU experts come from instead (such a cache holds no CPU expert files)."""
    ident = {"format_version": FORMAT_VERSION, "model": model_identity(ckpt), "quant": key_quant(quant)}
    if cpu_experts_from is not None:
        ident["cpu_experts_from"] = cpu_experts_from
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
