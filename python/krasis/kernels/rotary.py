"""Rotary position embedding of a few rows in one launch (decode steps), with ``ops.rope.Rotary.apply``'s
roundings: interleaved pairs (DeepSeek) rotate in float32 and round once; rotate-half rounds cos/sin to x's
dtype and each product and the sum, as torch does in that dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, stride_xt, stride_xh, stride_ct, stride_yt, stride_yh,
                   HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if h >= heads:
        return
    i = tl.arange(0, HALF)
    x_row = x_ptr + t.to(tl.int64) * stride_xt + h * stride_xh
    y_row = y_ptr + t.to(tl.int64) * stride_yt + h * stride_yh
    c = tl.load(cos_ptr + t * stride_ct + i)
    s = tl.load(sin_ptr + t * stride_ct + i)
    ty = y_ptr.dtype.element_ty
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        a = tl.load(x_row + 2 * i).to(tl.float32)
        b = tl.load(x_row + 2 * i + 1).to(tl.float32)
        tl.store(y_row + 2 * i, round_to(a * c - b * s, ty).to(ty))
        tl.store(y_row + 2 * i + 1, round_to(a * s + b * c, ty).to(ty))
    else:  # halves (i, i + HALF): y = x * cos + cat(-x2, x1) * sin, every step rounded to x's dtype
        a = tl.load(x_row + i).to(tl.float32)
        b = tl.load(x_row + HALF + i).to(tl.float32)
        c = round_to(c, ty)
        s = round_to(s, ty)
        lo = round_to(a * c, ty) + round_to(-b * s, ty)
        hi = round_to(b * c, ty) + round_to(a * s, ty)
        tl.store(y_row + i, round_to(lo, ty).to(ty))
        tl.store(y_row + HALF + i, round_to(hi, ty).to(ty))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotated copy of x [T, heads, dim] (any strides but a contiguous last dim); cos/sin float32 [T, dim/2]
    (already scaled, ``Rotary.angles``). Returns a contiguous [T, heads, dim] of x's dtype. No host sync."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x must be [T, heads, dim] with a contiguous last dim, got {tuple(x.shape)}")
    t, heads, dim = x.shape
    half = dim // 2
    if dim % 2 or half & (half - 1):
        raise ValueError(f"the rotated dim must be twice a power of two, got {dim}")
    if cos.shape != (t, half) or sin.shape != cos.shape or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos/sin must be [{t}, {half}] with equal strides, got {tuple(cos.shape)}")
    y = torch.empty((t, heads, dim), dtype=x.dtype, device=x.device)
    if t:
        _rotary_kernel[(t, heads)](x, cos, sin, y, heads, x.stride(0), x.stride(1), cos.stride(0), y.stride(0),
                                   y.stride(1), HALF=half, INTERLEAVED=interleaved, num_warps=1)
    return y
