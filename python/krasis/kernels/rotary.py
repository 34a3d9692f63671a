"""Rotary position embedding of a few rows in one launch (decode steps), with ``ops.rope.Rotary.apply``'s
roundings: interleaved pairs (DeepSeek) rotate in float32 and round once; rotate-half rounds cos/sin to x's
dtype and each product and the sum, as torch does in that dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _rotate(x_row, y_row, c, s, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """One head's rotation: x_row's dim values rotated by angles c, s (float32 [HALF]) into y_row."""
    i = tl.arange(0, HALF)
    ty = y_row.dtype.element_ty
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


@triton.jit
def _rotary_kernel(x_ptr, y_ptr, x2_ptr, y2_ptr, cos_ptr, sin_ptr, heads, stride_xt, stride_xh, stride_yt, stride_yh,
                   stride_x2t, stride_x2h, stride_y2t, stride_y2h, stride_ct,
                   HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    # programs (t, h): heads [0, heads) of x, then the heads of the second tensor (if any)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * stride_ct + i)
    s = tl.load(sin_ptr + t * stride_ct + i)
    if h < heads:
        _rotate(x_ptr + t * stride_xt + h * stride_xh, y_ptr + t * stride_yt + h * stride_yh, c, s, HALF,
                INTERLEAVED)
    else:
        g = h - heads
        _rotate(x2_ptr + t * stride_x2t + g * stride_x2h, y2_ptr + t * stride_y2t + g * stride_y2h, c, s, HALF,
                INTERLEAVED)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"x must be [T, heads, dim] with a contiguous last dim, got {tuple(x.shape)}")
    t, _, dim = x.shape
    half = dim // 2
    if dim % 2 or half & (half - 1):
        raise ValueError(f"the rotated dim must be twice a power of two, got {dim}")
    if cos.shape != (t, half) or sin.shape != cos.shape or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"cos/sin must be [{t}, {half}] with equal strides, got {tuple(cos.shape)}")


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotated copy of x [T, heads, dim] (any strides but a contiguous last dim); cos/sin float32 [T, dim/2]
    (already scaled, ``Rotary.angles``). Returns a contiguous [T, heads, dim] of x's dtype. No host sync."""
    return rotary_pair(x, None, cos, sin, interleaved)[0]


def rotary_pair(x: torch.Tensor, x2: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rotary`` of x and of x2 (same T and dim, its own heads; None: x alone) in one launch."""
    _check(x, cos, sin)
    t, heads, dim = x.shape
    y = torch.empty((t, heads, dim), dtype=x.dtype, device=x.device)
    y2, heads2 = None, 0
    if x2 is not None:
        _check(x2, cos, sin)
        if x2.shape[0] != t or x2.shape[2] != dim:
            raise ValueError(f"x2 must be [{t}, heads, {dim}] like x, got {tuple(x2.shape)}")
        heads2 = x2.shape[1]
        y2 = torch.empty((t, heads2, dim), dtype=x2.dtype, device=x2.device)
    if t:
        a, b = (x2, y2) if x2 is not None else (x, y)  # unread pointers without a second tensor
        _rotary_kernel[(t, heads + heads2)](x, y, a, b, cos, sin, heads, x.stride(0), x.stride(1), y.stride(0),
                                            y.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                            cos.stride(0), HALF=dim // 2, INTERLEAVED=interleaved, num_warps=1)
    return y, y2
