"""Reading the config.json fields that several families share, in both the hub's older style
(``rope_theta`` + ``rope_scaling``) and the newer ``rope_parameters``."""

from __future__ import annotations

from ..errors import ModelLoadError
from .spec import RopeSpec

SUPPORTED_ROPE_KINDS = ("default", "linear", "yarn")


def require(config: dict, key: str, family: str):
    """A config value that must be present."""
    if config.get(key) is None:
        raise ModelLoadError(f"config.json of this {family} model has no {key!r}; the file is incomplete or "
                             "belongs to another architecture")
    return config[key]


def rope_spec(config: dict, head_dim: int, *, interleaved: bool = False) -> RopeSpec:
    """The RoPE settings, merged from ``rope_parameters`` and the legacy ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in SUPPORTED_ROPE_KINDS:
        raise ModelLoadError(f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_KINDS)})")
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    original = (params.get("original_max_position_embeddings")
                or config.get("original_max_position_embeddings")
                or config.get("max_position_embeddings", 4096))
    factor = params.get("factor")
    if factor is None:
        factor = config.get("max_position_embeddings", original) / original if kind == "yarn" else 1.0
    return RopeSpec(
        dim=int(head_dim * partial),
        theta=theta,
        kind=kind,
        factor=float(factor),
        original_max_position=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def eos_token_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
