"""Routed experts on the GPU in the expert store's own byte layout (``src/store.rs``), so the store's pinned
host memory is copied to VRAM as it is: one contiguous copy per expert, no second host copy in another layout.

One expert is ``ExpertLayout.nbytes`` bytes (a page multiple): gate [I, H] at ``gate``, up [I, H] at ``up``,
down [H, I] at ``down``, each a CPU-layout matrix block (``gpu_layout``'s module docstring): packed uint8
[N, row_bytes] rows, then float32 scales [N, K/group] at the block's 64-aligned scales offset. The kernels read
a matrix as the transposed view [K_packed, N] (K contiguous, N at a stride of row_bytes) and its scales as
[K/group, N]; ``GPUExperts`` hands out those views, with a leading expert dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .gpu_layout import GPUQuantMatrix, check_shape, packed_rows

PAGE = 4096


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class ExpertLayout:
    """Byte offsets inside one expert (the Rust ``ExpertLayout``): each matrix block's start and its scales'."""

    hidden: int
    inter: int
    bits: int
    group: int
    gate: int
    up: int
    down: int
    gate_scales: int
    up_scales: int
    down_scales: int
    nbytes: int

    @staticmethod
    def of(hidden: int, inter: int, bits: int, group: int) -> ExpertLayout:
        """The layout the store gives experts of these dimensions and format."""
        check_shape(hidden, bits, group)
        check_shape(inter, bits, group)

        def block(n: int, k: int) -> tuple[int, int]:  # (scales offset, block bytes)
            scales = _align(n * packed_rows(k, bits), 64)
            return scales, scales + _align(n * (k // group) * 4, 64)

        g_scales, g_bytes = block(inter, hidden)
        d_scales, d_bytes = block(hidden, inter)
        up, down = g_bytes, 2 * g_bytes
        return ExpertLayout(hidden, inter, bits, group, 0, up, down, g_scales, up + g_scales, down + d_scales,
                            _align(down + d_bytes, PAGE))

    @staticmethod
    def from_store(layout: Mapping[str, object], bits: int, group: int) -> ExpertLayout:
        """From ``ExpertStore.layout()`` (a dict); raises if it is not the layout ``of`` computes."""
        gate, down = layout["gate"], layout["down"]
        got = ExpertLayout(gate["k"], gate["n"], bits, group, gate["offset"], layout["up"]["offset"],
                           down["offset"], gate["scales_offset"], layout["up"]["scales_offset"],
                           down["scales_offset"], layout["expert_nbytes"])
        want = ExpertLayout.of(gate["k"], gate["n"], bits, group)
        if got != want:
            raise ValueError(f"the expert store's layout {got} is not the one the GPU kernels read ({want})")
        return got


@dataclass
class GPUExperts:
    """E routed experts in the store layout: ``raw`` uint8 [E, >= layout.nbytes], each row contiguous, rows at
    any stride that is a multiple of 16 bytes (a slice of a larger buffer, every other slot, ...)."""

    raw: torch.Tensor
    layout: ExpertLayout

    def __post_init__(self):
        r = self.raw
        if r.dtype != torch.uint8 or r.dim() != 2 or r.shape[1] < self.layout.nbytes or r.stride(1) != 1:
            raise ValueError(f"raw must be uint8 [E, >= {self.layout.nbytes}] with contiguous rows, got {r.dtype} "
                             f"{tuple(r.shape)}")
        if r.shape[0] > 1 and r.stride(0) % 16:
            raise ValueError(f"expert rows must be 16-byte aligned apart, got a stride of {r.stride(0)} bytes")

    bits = property(lambda self: self.layout.bits)
    group = property(lambda self: self.layout.group)
    hidden = property(lambda self: self.layout.hidden)
    intermediate = property(lambda self: self.layout.inter)

    @property
    def num_experts(self) -> int:
        return self.raw.shape[0]

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        """Bytes of the experts' weights and scales (with each expert's padding to a page)."""
        return self.num_experts * self.layout.nbytes

    @property
    def row_stride(self) -> int:
        """Bytes from one expert to the next in ``raw`` (an expert's size where there is only one)."""
        return self.raw.stride(0) if self.num_experts > 1 else self.layout.nbytes

    def _view(self, offset: int, n: int, k: int, scales: bool) -> torch.Tensor:
        """[E, K_packed, N] uint8 weights (or [E, K/group, N] float32 scales) of the matrix at ``offset``."""
        row = self.row_stride
        if scales:
            f = self.raw.view(torch.float32)
            return torch.as_strided(f, (self.num_experts, k // self.group, n), (row // 4, 1, k // self.group),
                                    f.storage_offset() + offset // 4)
        kp = packed_rows(k, self.bits)
        return torch.as_strided(self.raw, (self.num_experts, kp, n), (row, 1, kp),
                                self.raw.storage_offset() + offset)

    def gate_up(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(gate weights [E, Kp(H), I], gate scales [E, H/g, I], up's offset from gate in weight bytes, and in
        scale elements): the kernels reach up's column n at gate's column n plus the offset."""
        lay, h, i = self.layout, self.hidden, self.intermediate
        return (self._view(lay.gate, i, h, False), self._view(lay.gate_scales, i, h, True), lay.up - lay.gate,
                (lay.up_scales - lay.gate_scales) // 4)

    def down(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down weights [E, Kp(I), H], down scales [E, I/g, H])."""
        lay = self.layout
        return self._view(lay.down, self.hidden, self.intermediate, False), self._view(
            lay.down_scales, self.hidden, self.intermediate, True)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GPUExperts:
        return GPUExperts(self.raw.to(device, non_blocking=non_blocking), self.layout)

    def slice(self, start: int, stop: int) -> GPUExperts:
        """A view of experts [start, stop)."""
        return GPUExperts(self.raw[start:stop], self.layout)

    def matrices(self, e: int) -> tuple[GPUQuantMatrix, GPUQuantMatrix, GPUQuantMatrix]:
        """Expert e's (gate [I, H], up [I, H], down [H, I]) as GPUQuantMatrix views (qweight [K_packed, N])."""
        h, i, lay = self.hidden, self.intermediate, self.layout
        one = self.slice(e, e + 1)
        mats = [(one._view(lay.gate, i, h, False), one._view(lay.gate_scales, i, h, True), i, h),
                (one._view(lay.up, i, h, False), one._view(lay.up_scales, i, h, True), i, h),
                (*one.down(), h, i)]
        return tuple(GPUQuantMatrix(q[0], s[0], n, k, self.bits, self.group) for q, s, n, k in mats)


def empty_experts(layout: ExpertLayout, count: int, device: torch.device | str, pin_memory: bool = False
                  ) -> GPUExperts:
    """Uninitialised room for ``count`` experts."""
    return GPUExperts(torch.empty((count, layout.nbytes), dtype=torch.uint8, device=device, pin_memory=pin_memory),
                      layout)


def copy_experts(dst: GPUExperts, src: GPUExperts) -> None:
    """dst <- src (as many experts), asynchronously on the current stream when src is pinned host memory."""
    if dst.layout != src.layout or dst.num_experts != src.num_experts:
        raise ValueError(f"copy of {src.num_experts} experts into {dst.num_experts} slots of another layout")
    n = src.layout.nbytes
    dst.raw[:, :n].copy_(src.raw[:, :n], non_blocking=True)


def experts_from_cpu_layout(gate: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            up: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            down: Sequence[tuple[torch.Tensor, torch.Tensor]],
                            bits: int, group: int) -> GPUExperts:
    """Per-expert CPU-layout (packed, scales) of gate [I, H], up [I, H], down [H, I] -> GPUExperts (on their
    device), laid out as the store lays them out."""
    if not (len(gate) == len(up) == len(down)) or not gate:
        raise ValueError("gate, up and down need the same, non-zero number of experts")
    i, h = gate[0][0].shape[0], down[0][0].shape[0]
    lay = ExpertLayout.of(h, i, bits, group)
    raw = torch.zeros((len(gate), lay.nbytes), dtype=torch.uint8, device=gate[0][0].device)
    for e, ((gq, gs), (uq, us), (dq, ds)) in enumerate(zip(gate, up, down, strict=True)):
        for (q, s), at, scales_at in (((gq, gs), lay.gate, lay.gate_scales), ((uq, us), lay.up, lay.up_scales),
                                      ((dq, ds), lay.down, lay.down_scales)):
            q, s = q.contiguous().view(-1), s.to(torch.float32).contiguous().view(-1).view(torch.uint8)
            raw[e, at:at + q.numel()] = q
            raw[e, scales_at:scales_at + s.numel()] = s
    return GPUExperts(raw, lay)


def experts_from_layer_bytes(raw: torch.Tensor, layout: Mapping[str, object], bits: int, group: int) -> GPUExperts:
    """A whole layer's expert bytes uint8 [E, expert_nbytes] (cache file / ExpertStore order) as GPUExperts:
    a view, nothing copied. ``layout`` is ``ExpertStore.layout()``."""
    return GPUExperts(raw, ExpertLayout.from_store(layout, bits, group))
