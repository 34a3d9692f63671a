"""Rotary position embeddings: inverse frequencies for default, linear and YaRN scaling, and their application
in the two channel layouts (rotate-half and interleaved pairs)."""

from __future__ import annotations

import math

import torch

from ..models.spec import RopeSpec


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32) and the factor applied to cos/sin."""
    dim = spec.dim
    pos_freqs = spec.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if spec.kind == "default":
        return 1.0 / pos_freqs, 1.0
    if spec.kind == "linear":
        return 1.0 / pos_freqs / spec.factor, 1.0
    # YaRN: interpolate the low frequencies, extrapolate the high ones, ramp in between.
    factor = spec.factor
    if spec.attention_factor is not None:
        attn = float(spec.attention_factor)
    elif spec.mscale and spec.mscale_all_dim:
        attn = _yarn_mscale(factor, spec.mscale) / _yarn_mscale(factor, spec.mscale_all_dim)
    else:
        attn = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(spec.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attn


class Rotary:
    """cos/sin tables for positions, computed on demand and kept for reuse."""

    def __init__(self, spec: RopeSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        inv_freq, self.scale = inv_freq_and_scale(spec)
        self.inv_freq = inv_freq.to(device)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, float32 [T, dim/2], already multiplied by the attention factor."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.scale, freqs.sin() * self.scale

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., T, heads, dim] (the rotated slice only); returns x's dtype.

        Rotate-half models round cos/sin to x's dtype first and rotate in that dtype (as the reference does);
        interleaved (DeepSeek) rotation is done in float32.
        """
        if self.spec.interleaved:
            xf = x.float().reshape(*x.shape[:-1], -1, 2)
            c, s = cos[:, None, :], sin[:, None, :]
            a, b = xf[..., 0], xf[..., 1]
            out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
            return out.to(x.dtype)
        c = torch.cat((cos, cos), dim=-1)[:, None, :].to(x.dtype)
        s = torch.cat((sin, sin), dim=-1)[:, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * c + rotated * s
