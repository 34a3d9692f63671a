"""The GPU layout of INT8 / INT4 weights: a transpose of the CPU cache's bytes, so no requantisation.

The CPU layout (``src/quant.rs``) stores a quantised matrix W [N, K] (N outputs, K inputs) as

    packed  uint8  [N, row_bytes]   row_bytes = K (INT8) or K/2 (INT4)
    scales  f32    [N, K/group]

with symmetric values stored with an offset: INT8 byte = q + 128 (q in -127..127), INT4 nibble = q + 8
(q in -7..7); the weight is ``q * scale[n, k // group]``. INT4 packs each block of 64 consecutive K values
of a row into 32 bytes: byte j of the block holds value j (low nibble) and value j + 32 (high nibble).
K is a multiple of 64 and of group (32, 64 or 128).

The GPU layout is the transpose of those same bytes (N contiguous, so kernels load along N coalesced):

    qweight uint8  [K_packed, N]    K_packed = K (INT8) or K/2 (INT4)
    scales  f32    [K/group, N]

INT4 row r (block b = r // 32, j = r % 32) holds k = 64*b + j in its low nibble and k = 64*b + 32 + j in
its high nibble. CPU and GPU therefore compute with bit-identical weights.

Routed experts stay in the CPU layout itself (``expert_layout``): the kernels read it through transposed
views, so the expert store's memory is copied to VRAM unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 127 if bits == 8 else 7


def check_shape(k: int, bits: int, group: int) -> None:
    _qmax(bits)
    if group not in GROUP_SIZES:
        raise ValueError(f"group must be one of {GROUP_SIZES}, got {group}")
    if k % 64 or k % group:
        raise ValueError(f"K={k} must be a multiple of 64 and of group={group}")


def packed_rows(k: int, bits: int) -> int:
    """Rows of the GPU qweight (bytes per CPU row) for K inputs."""
    return k if bits == 8 else k // 2


def k_step(bits: int, group: int) -> tuple[int, int, bool]:
    """How a kernel walks K in this layout: (K values per step, packed rows per step, whether a step's low and
    high nibbles have their own scale rows). A step is one group (INT8), or max(group, 64) values (INT4: whole
    64-value blocks; with group 32 each block's two halves are two groups)."""
    if bits == 8:
        return group, group, False
    bk = max(group, 64)
    return bk, bk // 2, group == 32


@dataclass
class GPUQuantMatrix:
    """One quantised W [N, K] in the GPU layout: qweight uint8 [K_packed, N], scales float32 [K/group, N]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int
    bits: int
    group: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GPUQuantMatrix:
        return GPUQuantMatrix(self.qweight.to(device, non_blocking=non_blocking),
                              self.scales.to(device, non_blocking=non_blocking), self.n, self.k, self.bits, self.group)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes


def quantize_cpu_layout(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise w [N, K] -> (packed uint8 [N, row_bytes], scales float32 [N, K/group]) in the CPU layout.

    Bit-identical to the Rust ``quantize_rows``: scale = max|w| / qmax per group (f32), q = w * (1/scale)
    rounded half away from zero the way ``round_i32`` does it (add ±0.5 in f32, truncate), clamped to ±qmax;
    a group of zeros gets scale 0 and q = 0.
    """
    n, k = w.shape
    check_shape(k, bits, group)
    qmax = _qmax(bits)
    wg = w.to(torch.float32).reshape(n, k // group, group)
    scales = wg.abs().amax(dim=2) / qmax
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    v = wg * inv[:, :, None]
    # f32 add then truncate, exactly as Rust's (v + 0.5f32.copysign(v)) as i32 (round differs near .5 - ulp)
    q = (v + torch.copysign(torch.full_like(v, 0.5), v)).trunc().clamp(-qmax, qmax).to(torch.int32)
    q = q.reshape(n, k)
    if bits == 8:
        packed = (q + 128).to(torch.uint8)
    else:
        blocks = (q + 8).reshape(n, k // 64, 2, 32)
        packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).to(torch.uint8).reshape(n, k // 2)
    return packed, scales.contiguous()


def to_gpu_layout(packed: torch.Tensor, scales: torch.Tensor, n: int, k: int, bits: int, group: int) -> GPUQuantMatrix:
    """CPU-layout packed uint8 [N, row_bytes] + scales float32 [N, K/group] -> GPUQuantMatrix (on their device)."""
    check_shape(k, bits, group)
    kp = packed_rows(k, bits)
    if tuple(packed.shape) != (n, kp) or tuple(scales.shape) != (n, k // group):
        raise ValueError(f"expected packed [{n}, {kp}] and scales [{n}, {k // group}], "
                         f"got {tuple(packed.shape)} and {tuple(scales.shape)}")
    return GPUQuantMatrix(packed.t().contiguous(), scales.to(torch.float32).t().contiguous(), n, k, bits, group)


def unpack_gpu(qweight: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """GPU-layout qweight uint8 [K_packed, N] -> signed values int32 [K, N] in k order."""
    if bits == 8:
        return qweight.to(torch.int32) - 128
    kp, n = qweight.shape
    q = qweight.to(torch.int32).reshape(kp // 32, 32, n)
    # rows of block b: low nibbles are k = 64b + j, high nibbles k = 64b + 32 + j
    return (torch.stack(((q & 0x0F), (q >> 4)), dim=1) - 8).reshape(k, n)


def dequantize_gpu(m: GPUQuantMatrix) -> torch.Tensor:
    """The real weights float32 [N, K] of a GPU-layout matrix (reference for the kernels)."""
    q = unpack_gpu(m.qweight, m.k, m.bits).to(torch.float32)
    s = m.scales.to(torch.float32).repeat_interleave(m.group, dim=0)
    return (q * s).t().contiguous()
