"""The machine's ceilings that Krasis' benchmarks divide by: host-to-device and device-to-host copy bandwidth
(pinned and pageable), DRAM read bandwidth (Krasis' own pinned thread pool), dense BF16 matmul rate and
on-device copy bandwidth.

    python benchmarks/bounds.py                 # everything this machine has (GPU figures need CUDA)
    python benchmarks/bounds.py --json b.json   # also write the numbers

Bandwidths are in GB/s (1e9 bytes per second), matmul rates in TFLOP/s (1e12). GPU figures are timed with CUDA
events and are the median of several repeats after a warm-up. On a machine without a CUDA GPU the GPU
functions raise ``NoGPU`` with a clear message and the CLI prints "n/a" for them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

import torch

GB = 1e9


class NoGPU(RuntimeError):
    """A GPU figure was asked for on a machine without a usable CUDA GPU."""


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise NoGPU("no CUDA GPU is visible (torch.cuda.is_available() is False; "
                    f"torch {torch.__version__}, built with CUDA {torch.version.cuda})")


def median_event_seconds(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def h2d_bandwidth(pinned: bool = True, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Host-to-device copy rate in GB/s for one ``nbytes`` copy (pinned or pageable host memory)."""
    _need_cuda()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)  # touch every page so the first copy does not pay for faulting them in
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    seconds = median_event_seconds(lambda: dev.copy_(host, non_blocking=pinned), repeats)
    return nbytes / seconds / GB


def d2h_bandwidth(pinned: bool = True, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Device-to-host copy rate in GB/s for one ``nbytes`` copy (pinned or pageable host memory)."""
    _need_cuda()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    seconds = median_event_seconds(lambda: host.copy_(dev, non_blocking=pinned), repeats)
    return nbytes / seconds / GB


def device_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """On-device memory bandwidth in GB/s of a ``nbytes`` device-to-device copy, counting bytes read plus bytes
    written (2 * nbytes per copy), the usual convention for memory bandwidth."""
    _need_cuda()
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = median_event_seconds(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / seconds / GB


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                  device: str = "cuda") -> float:
    """Dense matmul rate in TFLOP/s for an n x n x n product of random inputs (2 n^3 FLOPs). ``device="cpu"`` is
    accepted for testing the logic (timed with perf_counter)."""
    if device == "cpu":
        import time

        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return 2 * n ** 3 / statistics.median(times) / 1e12
    _need_cuda()
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    seconds = median_event_seconds(lambda: torch.matmul(a, b, out=out), repeats, warmup=3)
    return 2 * n ** 3 / seconds / 1e12


def dram_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """DRAM read rate in GB/s, measured by Krasis' Rust thread pool (``krasis._core.read_bandwidth``, best of
    ``repeats`` reads of a ``nbytes`` buffer by the same pinned workers that run the CPU experts)."""
    try:
        from krasis import _core
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from krasis import _core
    return _core.read_bandwidth(nbytes, repeats) / GB


def measure_all(gpu: bool = True, quick: bool = False) -> dict[str, float | None]:
    """Every figure above (None where it cannot be measured here), keyed by name; units in the key."""
    size = (1 << 28) if quick else (1 << 30)
    out: dict[str, float | None] = {}
    steps: list[tuple[str, Callable[[], float]]] = [("dram_read_gbps", lambda: dram_read_bandwidth(size))]
    if gpu:
        steps += [
            ("h2d_pinned_gbps", lambda: h2d_bandwidth(True, size)),
            ("h2d_pageable_gbps", lambda: h2d_bandwidth(False, size)),
            ("d2h_pinned_gbps", lambda: d2h_bandwidth(True, size)),
            ("d2h_pageable_gbps", lambda: d2h_bandwidth(False, size)),
            ("device_copy_gbps", lambda: device_copy_bandwidth(size)),
            ("matmul_bf16_tflops", lambda: matmul_tflops(4096 if quick else 8192)),
        ]
    no_gpu = None
    for name, fn in steps:
        out[name] = None
        if no_gpu is None or name == "dram_read_gbps":
            try:
                out[name] = fn()
            except NoGPU as e:
                no_gpu = e
    if no_gpu is not None:
        print(f"GPU figures: n/a ({no_gpu})", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--quick", action="store_true", help="256 MiB buffers and a 4096 matmul")
    p.add_argument("--no-gpu", action="store_true", help="only the CPU figure")
    args = p.parse_args()
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print("no CUDA GPU visible: GPU figures are n/a")
    r = measure_all(gpu=not args.no_gpu, quick=args.quick)
    print("| figure | value |")
    print("|---|---|")
    for name, v in r.items():
        unit = "TFLOP/s" if name.endswith("tflops") else "GB/s"
        print(f"| {name.rsplit('_', 1)[0]} | {'n/a' if v is None else f'{v:,.1f} {unit}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
