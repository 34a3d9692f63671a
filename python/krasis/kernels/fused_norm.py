"""RMSNorm fused with the residual additions before it, in one launch per call (decode steps).

In torch a decode step's norm and residual sums are ~12 small kernels; inside a CUDA graph each still costs
a few microseconds, which for one token is more than the work. This kernel reproduces ``ops.norms.rms_norm``
and the residual sums of ``engine.forward`` with the same roundings: every sum is rounded to x's dtype where
torch rounds it, and the norm is computed in float32.

    r      = round(round(a + b) + c)      (a, b float32 shares of the routed experts; c the shared expert)
    x'     = round(x + r)                 (or round(x + c) without a, b; or x unchanged with no addend)
    normed = rms_norm(x', weight)         (offset 0: weight * round(normed), offset 1: round(normed * (1 + w)))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _add_rms_norm_kernel(x_ptr, a_ptr, b_ptr, c_ptr, w_ptr, x_out_ptr, y_ptr, D, eps,
                         stride_x, stride_a, stride_b, stride_c, stride_xo, stride_y,
                         HAS_AB: tl.constexpr, HAS_C: tl.constexpr, CLEAR_AB: tl.constexpr, OFFSET: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    out_ty = x_ptr.dtype.element_ty  # every rounding is to x's dtype, as torch's sums of x's dtype are
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_AB:
        r = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
        r += tl.load(b_ptr + row * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
        if CLEAR_AB:  # consumed: zeroed here for the next sums, instead of by a launch of their own
            # every thread's loads done before any thread's stores: the compiler may give the two different layouts
            tl.debug_barrier()
            zero = tl.zeros((BLOCK,), dtype=tl.float32)
            tl.store(a_ptr + row * stride_a + offs, zero.to(a_ptr.dtype.element_ty), mask=mask)
            tl.store(b_ptr + row * stride_b + offs, zero.to(b_ptr.dtype.element_ty), mask=mask)
        r = round_to(r, out_ty)
        if HAS_C:
            r = round_to(r + tl.load(c_ptr + row * stride_c + offs, mask=mask, other=0.0).to(tl.float32), out_ty)
        x = round_to(x + r, out_ty)
    elif HAS_C:
        x = round_to(x + tl.load(c_ptr + row * stride_c + offs, mask=mask, other=0.0).to(tl.float32), out_ty)
    if HAS_AB or HAS_C:
        tl.store(x_out_ptr + row * stride_xo + offs, x.to(x_out_ptr.dtype.element_ty), mask=mask)
    normed = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OFFSET == 0:
        y = w * round_to(normed, out_ty)
    else:
        y = normed * (OFFSET + w)
    y_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + row * stride_y + offs, round_to(y, y_ty).to(y_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 a: torch.Tensor | None = None, b: torch.Tensor | None = None, c: torch.Tensor | None = None,
                 x_out: torch.Tensor | None = None, y: torch.Tensor | None = None, clear_ab: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', rms_norm(x')) with x' = x plus the addends as the module docstring rounds them; x [T, D], addends
    [T, D] (a and b together or not at all), weight [D]. x' is written to ``x_out`` when given (it may be x
    itself); with no addend x' is x. The norm has x's dtype (promoted with the weight's, as torch does, without
    an offset) and is written to ``y`` when given. ``clear_ab`` zeroes a and b once read. No host sync."""
    if (a is None) != (b is None):
        raise ValueError("the float32 shares a and b go together")
    if clear_ab and a is None:
        raise ValueError("clear_ab needs the shares a and b")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, D] with contiguous rows, got {tuple(x.shape)}")
    t, d = x.shape
    has_ab, has_c = a is not None, c is not None
    if not (has_ab or has_c):
        x_out = x
    elif x_out is None:
        x_out = torch.empty_like(x)
    # torch's weight * normed promotes (a float32 weight gives float32); with an offset the result is x's dtype
    y_dtype = torch.promote_types(x.dtype, weight.dtype) if not offset else x.dtype
    if y is None:
        y = torch.empty_like(x, dtype=y_dtype)
    elif y.dtype != y_dtype:
        raise ValueError(f"y must be {y_dtype}, got {y.dtype}")
    for part in (a, b, c, x_out, y):
        if part is not None and (part.shape != x.shape or part.stride(1) != 1):
            raise ValueError(f"addends and outputs must be {tuple(x.shape)} with contiguous rows")
    if t == 0:
        return x_out, y

    def stride(p: torch.Tensor | None) -> int:
        return 0 if p is None else p.stride(0)

    _add_rms_norm_kernel[(t,)](x, x if a is None else a, x if b is None else b, x if c is None else c, weight,
                               x_out, y, d, eps, x.stride(0), stride(a), stride(b), stride(c), x_out.stride(0),
                               y.stride(0), HAS_AB=has_ab, HAS_C=has_c, CLEAR_AB=clear_ab, OFFSET=float(offset),
                               BLOCK=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8)
    return x_out, y
