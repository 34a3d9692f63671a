"""Rounding float32 values to a narrower dtype inside Triton kernels, the same compiled and interpreted.

Compiled Triton rounds float32 -> bfloat16 to nearest even, as torch does; Triton's interpreter (the CPU
tests) truncates. Kernels that must reproduce torch's roundings step by step round with ``round_to``, which
does round-to-nearest-even on the bits for bfloat16 and so gives one answer everywhere; ``round_to_e4m3``
does the same for float8 e4m3.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(v, ty: tl.constexpr):
    """float32 v rounded to the values of dtype ``ty`` (still float32): round-to-nearest-even for bfloat16,
    a plain cast otherwise (a no-op for float32). NaN and infinity are not expected."""
    if ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(ty).to(tl.float32)


@triton.jit
def round_to_e4m3(v):
    """float32 v (|v| <= 448) rounded to nearest even among float8 e4m3 values (still float32), on the bits:
    the interpreter's own cast carries wrongly across binades. Below 2^-6 (e4m3's subnormals, spaced 2^-9)
    2^-6 is added first so that the same 3-bit rounding applies."""
    a = tl.abs(v)
    small = a < 0.015625
    bits = tl.where(small, a + 0.015625, a).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    r = bits.to(tl.float32, bitcast=True)
    r = tl.where(small, r - 0.015625, r)
    return tl.where(v < 0, -r, r)
