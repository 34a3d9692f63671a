"""One-program kernels through which a CUDA graph hands work to the host and waits for it to be done.

``flags`` is an int64 [>= 3] tensor in page-locked host memory, which the GPU reads and writes directly (unified
addressing maps it): [0] the last handshake the GPU staged, [1] the last the host answered, [2] nonzero when the
GPU gave up waiting (the handshake it gave up on); a prefetch adds [3] and [4], the last handshake whose copies
(queued by the host for MoE layers of even and odd index) have landed. ``seq`` is an int64 [1] device tensor
counting handshakes, so a graph replayed many times keeps numbering them. The host's half is ``decode_link`` in
the Rust extension.

A poll of host memory takes about a microsecond over PCIe; after WAIT_POLLS of them (tens of seconds) the wait
gives up rather than hang the GPU forever, and records which handshake it gave up on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WAIT_POLLS = 20_000_000
# What the host writes to the answer flag to let every remaining wait of an aborted step pass at once.
RELEASED = 1 << 62


@triton.jit
def _signal_kernel(seq_ptr, flags_ptr):
    s = tl.load(seq_ptr) + 1
    tl.store(seq_ptr, s)
    tl.store(flags_ptr, s)


@triton.jit
def _wait_kernel(seq_ptr, flags_ptr, src_ptr, dst_ptr, N, POLLS: tl.constexpr, COPY: tl.constexpr,
                 BLOCK: tl.constexpr):
    s = tl.load(seq_ptr)
    # volatile: each poll reads host memory again instead of a value the compiler kept
    answered = tl.load(flags_ptr + 1, volatile=True)
    polls = 0
    while (answered < s) & (polls < POLLS):
        answered = tl.load(flags_ptr + 1, volatile=True)
        polls += 1
    if answered < s:
        tl.store(flags_ptr + 2, s)
    if COPY:  # the host's answer, written before it raised the flag
        for i in range(0, N, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < N, volatile=True), mask=offs < N)


@triton.jit
def _wait_copied_kernel(seq_ptr, flags_ptr, late_ptr, INDEX: tl.constexpr, POLLS: tl.constexpr,
                        RELEASED: tl.constexpr, COUNT: tl.constexpr):
    want = tl.load(seq_ptr) - 1
    done = tl.load(flags_ptr + INDEX, volatile=True)
    polls = 0
    # an aborted step's release (flags[1]) lets it pass too: a copy's late flag may overwrite the release of INDEX
    while (done < want) & (polls < POLLS):
        if tl.load(flags_ptr + 1, volatile=True) >= RELEASED:
            done = want
        else:
            done = tl.load(flags_ptr + INDEX, volatile=True)
        polls += 1
    if done < want:
        tl.store(flags_ptr + 2, want + 1)
    if COUNT:
        if polls > 0:
            tl.atomic_add(late_ptr, tl.full([], 1, tl.int64))
            tl.atomic_add(late_ptr + 1, polls + tl.zeros([], tl.int64))  # (int64 whether polls is a scalar or not)


@triton.jit
def _mark_kernel(seq_ptr, hints_ptr, ahead):
    tl.store(hints_ptr, tl.load(seq_ptr) + ahead)


def mark_hints(seq: torch.Tensor, hints: torch.Tensor, ahead: int = 0) -> None:
    """Tell the host that the hints (``hints[1:]``, int64 in page-locked host memory, written by work queued before
    this on the same stream) belong to the current handshake (``ahead`` = 1: to the next, not yet signalled):
    ``hints[0]`` = seq + ahead."""
    _mark_kernel[(1,)](seq, hints, ahead)


def wait_copied(seq: torch.Tensor, flags: torch.Tensor, index: int, polls: int = WAIT_POLLS,
                late: torch.Tensor | None = None) -> None:
    """Hold the stream until ``flags[index]`` reaches the previous handshake (seq - 1): the host has queued, during
    that handshake, copies whose landing a copy engine then wrote there, or until the host releases an aborted step
    (flags[1] >= RELEASED). Gives up as ``wait_host`` does. With ``late`` (int64 [2] on the device), a wait that
    found the copies not yet landed adds 1 to late[0] and its polls to late[1] (a poll reads page-locked memory
    once or twice: ~1-2 µs)."""
    if late is not None and (late.dtype != torch.int64 or late.numel() != 2 or late.device != seq.device):
        raise ValueError(f"late must be int64 [2] on {seq.device}, got {late.dtype} {tuple(late.shape)} on "
                         f"{late.device}")
    _wait_copied_kernel[(1,)](seq, flags, flags if late is None else late, INDEX=index, POLLS=polls,
                              RELEASED=RELEASED, COUNT=late is not None)


def signal_host(seq: torch.Tensor, flags: torch.Tensor) -> None:
    """Count one more handshake and tell the host (flags[0]) that its inputs are in place. The inputs must
    have been written by work queued before this on the same stream."""
    _signal_kernel[(1,)](seq, flags)


def wait_host(seq: torch.Tensor, flags: torch.Tensor, polls: int = WAIT_POLLS, src: torch.Tensor | None = None,
              dst: torch.Tensor | None = None) -> None:
    """Hold the stream until the host has answered the current handshake (flags[1] reaches seq); then copy
    ``src`` (the host's answer, page-locked) into ``dst`` (same shape and dtype, contiguous) when given: one
    launch instead of a wait and a copy."""
    if src is None:
        _wait_kernel[(1,)](seq, flags, flags, flags, 0, POLLS=polls, COPY=False, BLOCK=16)
        return
    if dst is None or src.shape != dst.shape or src.dtype != dst.dtype or not (src.is_contiguous()
                                                                               and dst.is_contiguous()):
        raise ValueError("src and dst must be contiguous tensors of one shape and dtype")
    n = src.numel()
    _wait_kernel[(1,)](seq, flags, src, dst, n, POLLS=polls, COPY=True, BLOCK=min(triton.next_power_of_2(n), 4096))
