"""Lazy, memory-mapped reading of a Hugging Face model directory (config.json + safetensors shards).

Nothing is read until a tensor is asked for; every problem is reported with the file it concerns and
what to do about it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ModelLoadError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_config(model_dir: str | Path) -> dict:
    """The parsed ``config.json`` of a model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist; pass the folder that holds "
                             "config.json and the *.safetensors files (--model-path)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: this is not a Hugging Face model directory. "
                             "Point --model-path at the folder that holds config.json, tokenizer.json and the "
                             "*.safetensors files (as downloaded from the hub)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-download the model's config.json") from e


def _read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path} is truncated ({size} bytes, no header); re-download it")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ModelLoadError(f"{path} is truncated or corrupt (header says {header_len} bytes, file has "
                                 f"{size}); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path} has a corrupt header ({e}); re-download it") from e
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if info["dtype"] in _DTYPE_BYTES and stop - begin != numel * _DTYPE_BYTES[info["dtype"]]:
            raise ModelLoadError(f"{path} is corrupt: tensor {name!r} of shape {info['shape']} and dtype "
                                 f"{info['dtype']} spans {stop - begin} bytes; re-download it")
        end = max(end, stop)
    if end > data_len:
        raise ModelLoadError(f"{path} is truncated: its tensors need {end} bytes of data but the file holds "
                             f"{data_len}; the download was probably interrupted, re-download this file")
    return header


class Checkpoint:
    """The tensors of a model directory, read lazily from memory-mapped safetensors files.

    Handles one ``model.safetensors`` or many shards listed in ``model.safetensors.index.json``.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.config = read_config(self.model_dir)
        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.model_dir / name).is_file():
                    raise ModelLoadError(f"shard {name} listed in {index_path.name} is missing from "
                                         f"{self.model_dir}; download it (all shards are needed)")
        else:
            files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{self.model_dir} has no *.safetensors weight files; Krasis reads "
                                     "safetensors checkpoints (download the model's .safetensors files)")
        self._location: dict[str, str] = {}
        self._headers: dict[str, dict] = {}
        for name in files:
            header = _read_header(self.model_dir / name)
            self._headers[name] = header
            for tensor in header:
                if tensor != "__metadata__":
                    self._location[tensor] = name
        self._handles: dict[str, object] = {}

    @property
    def files(self) -> list[str]:
        """The safetensors file names, sorted."""
        return sorted(self._headers)

    def headers(self) -> dict[str, dict]:
        """Each file's safetensors header (tensor name -> dtype, shape, offsets)."""
        return self._headers

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def names(self) -> list[str]:
        return sorted(self._location)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[self._location[name]][name]["shape"])

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor as stored (dtype unchanged), checked against ``shape`` when given."""
        if name not in self._location:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}; the "
                                 "files do not match config.json (incomplete download, or a different model)")
        if shape is not None and self.shape(name) != tuple(shape):
            raise ModelLoadError(f"tensor {name!r} has shape {list(self.shape(name))} but config.json implies "
                                 f"{list(shape)}; config.json and the weights belong to different models")
        file = self._location[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(self.model_dir / file), framework="pt")
            self._handles[file] = handle
        return handle.get_tensor(name)
