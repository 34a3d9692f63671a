"""Tiny GGUF files for tests: tensors written with the `gguf` package's own writer, and a GGUF holding a tiny
checkpoint's routed experts (fused per layer, as llama.cpp writes them), quantised with `gguf.quants`."""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from gguf import GGMLQuantizationType as Q

from krasis.models import spec_from_config


def write_gguf(path: Path, arch: str, layers: dict, meta: dict | None = None,
               split_at: int | None = None) -> list[Path]:
    """Write {tensor name: (uint8 blocks or float array, type)} into a GGUF (or a 2-part split GGUF); returns the
    file(s)."""
    names = list(layers)
    parts = [names] if split_at is None else [names[:split_at], names[split_at:]]
    files = []
    for i, part in enumerate(parts):
        p = path if split_at is None else path.with_name(f"{path.stem}-{i + 1:05d}-of-{len(parts):05d}.gguf")
        w = gguf.GGUFWriter(p, arch)
        if i == 0:
            for key, v in (meta or {}).items():
                w.add_uint32(f"{arch}.{key}", v)
        for name in part:
            data, qtype = layers[name]
            if qtype in (Q.F32, Q.F16):
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, data, raw_dtype=qtype)  # the writer derives the shape from the bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        files.append(p)
    return files


def gguf_of_checkpoint(ckpt_dir: Path, out: Path, qtype: Q = Q.Q8_0) -> Path:
    """A GGUF at ``out`` holding the checkpoint's routed experts (fused per layer), quantised to ``qtype``."""
    from krasis.checkpoint import Checkpoint
    from krasis.engine.weights import read_expert_tensors

    ckpt = Checkpoint(ckpt_dir)
    spec = spec_from_config(ckpt.config)
    tensors = {}
    for index, layer in enumerate(spec.layers):
        if not layer.is_moe:
            continue
        per = [read_expert_tensors(ckpt, spec, layer, e) for e in range(spec.moe.num_experts)]
        for role in ("gate", "up", "down"):
            w = torch.stack([p[role].float() for p in per]).numpy()
            tensors[f"blk.{index}.ffn_{role}_exps.weight"] = (gguf.quants.quantize(w, qtype), qtype)
    arch = {"Qwen3MoeForCausalLM": "qwen3moe", "DeepseekV2ForCausalLM": "deepseek2"}[ckpt.config["architectures"][0]]
    return write_gguf(out, arch, tensors, {"expert_count": spec.moe.num_experts})[0]
