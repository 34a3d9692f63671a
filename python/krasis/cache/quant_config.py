"""Which parts of a model are quantised, and how."""

from __future__ import annotations

from dataclasses import asdict, dataclass

EXPERT_BITS = (4, 8)
DENSE_QUANTS = ("int8", "bf16")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantConfig:
    """Quantisation of each weight kind (the cache key includes all of it).

    cpu_expert_bits / gpu_expert_bits: routed experts for the CPU kernels / the GPU kernels (4 or 8);
    shared_expert_quant, dense_mlp_quant, lm_head_quant, attention_quant: "int8" or "bf16";
    group_size: values per scale along the input dimension (32, 64, 128).
    """

    cpu_expert_bits: int = 4
    gpu_expert_bits: int = 4
    shared_expert_quant: str = "int8"
    dense_mlp_quant: str = "int8"
    lm_head_quant: str = "int8"
    attention_quant: str = "bf16"
    group_size: int = 128

    def __post_init__(self):
        for name in ("cpu_expert_bits", "gpu_expert_bits"):
            if getattr(self, name) not in EXPERT_BITS:
                raise ValueError(f"{name} must be 4 or 8, not {getattr(self, name)!r}")
        for name in ("shared_expert_quant", "dense_mlp_quant", "lm_head_quant", "attention_quant"):
            if getattr(self, name) not in DENSE_QUANTS:
                raise ValueError(f"{name} must be 'int8' or 'bf16', not {getattr(self, name)!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be 32, 64 or 128, not {self.group_size!r}")

    def as_dict(self) -> dict:
        return asdict(self)
