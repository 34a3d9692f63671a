"""Finding models: every Hugging Face safetensors directory under ``~/.krasis/models`` (and any extra folder),
described from config.json and the safetensors headers alone, without reading a weight."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Checkpoint, read_config
from ..errors import KrasisError
from ..models import spec_from_config
from ..models.spec import ArchSpec, attention_summary, routing_summary
from ..paths import models_dir
from .estimate import ram_bytes

QUANTS = {"bf16": 16, "int8": 8, "int4": 4}


@dataclass
class ModelInfo:
    path: Path
    architecture: str = ""
    family: str = ""
    attention: str = ""  # models.spec.attention_summary
    routing: str = ""  # models.spec.routing_summary
    layers: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    top_k: int = 0
    params: int = 0
    max_context: int = 0
    ram_bytes: dict[str, int] = field(default_factory=dict)  # "bf16" / "int8" / "int4" -> bytes
    gguf_files: list[Path] = field(default_factory=list)
    spec: ArchSpec | None = None
    error: str | None = None  # why it cannot be used (unsupported architecture, broken files)

    @property
    def name(self) -> str:
        return self.path.name


def _param_count(ckpt: Checkpoint) -> int:
    total = 0
    for header in ckpt.headers().values():
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


def _ggufs_beside(model_dir: Path) -> list[Path]:
    """GGUF files inside the model directory, or next to it with the model's name in theirs."""
    inside = sorted(model_dir.glob("*.gguf"))
    key = model_dir.name.lower()
    beside = sorted(p for p in model_dir.parent.glob("*.gguf") if key in p.name.lower())
    return inside + beside


def describe(model_dir: Path) -> ModelInfo:
    """What a model directory holds; problems go in ``error`` rather than raising."""
    info = ModelInfo(path=model_dir, gguf_files=_ggufs_beside(model_dir))
    try:
        config = read_config(model_dir)
        info.architecture = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
        spec = spec_from_config(config)
        ckpt = Checkpoint(model_dir)  # reads and checks the safetensors headers only
    except KrasisError as e:
        info.error = str(e)
        return info
    except (KeyError, TypeError, ValueError) as e:
        info.error = f"config.json is incomplete ({type(e).__name__}: {e})"
        return info
    info.spec, info.family, info.layers = spec, spec.family, spec.num_layers
    info.attention, info.routing = attention_summary(spec), routing_summary(spec)
    info.max_context = spec.max_position_embeddings
    if spec.moe is not None:
        info.routed_experts, info.top_k = spec.moe.num_experts, spec.moe.router.top_k
        shared = config.get("n_shared_experts")
        info.shared_experts = int(shared) if shared else (1 if spec.moe.shared_intermediate_size else 0)
    info.params = _param_count(ckpt)
    info.ram_bytes = {name: ram_bytes(spec, info.params, bits) for name, bits in QUANTS.items()}
    return info


def scan(extra_dirs: list[str | Path] = ()) -> list[ModelInfo]:
    """Every model directory (a folder with config.json) directly under ``~/.krasis/models`` and ``extra_dirs``
    (an extra folder that is itself a model directory counts too), sorted by name."""
    found: dict[Path, ModelInfo] = {}
    for root in [models_dir(), *(Path(d).expanduser() for d in extra_dirs if d)]:
        if not root.is_dir():
            continue
        candidates = [root] if (root / "config.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
        for d in candidates:
            if (d / "config.json").is_file() and d.resolve() not in found:
                found[d.resolve()] = describe(d)
    return sorted(found.values(), key=lambda m: m.name.lower())


def human_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
