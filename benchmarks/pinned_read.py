"""How fast the GPU reads page-locked host memory: the copy engine against a kernel's own loads.

Decode's streamed and prefetched experts are read by kernels inside the step's CUDA graph (the routing that
picks them is on the GPU, and a copy engine needs the address at queue time). This probe times, on the same
host buffers, a host-to-device copy (the copy engine) and a grid-stride Triton copy kernel over a sweep of
programs and warps, for torch's pinned memory (cudaHostAlloc) and for anonymous memory asked for in huge pages
and registered with cudaHostRegister (as the expert store's memory would be). Then both links at once: the CPU
expert kernels' thread pool reading DRAM while the GPU reads host memory, as decode's split would run them.

    python benchmarks/pinned_read.py --mib 256
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import threading
import time

import numpy as np
import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
from bounds import median_event_seconds  # noqa: E402

from krasis import _core  # noqa: E402

BLOCK = 4096  # int32 words a program moves per iteration


@triton.jit
def _read_kernel(src_ptr, dst_ptr, n, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr):
    for start in range(tl.program_id(0) * BLOCK, n, PROGRAMS * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def registered_huge(nbytes: int) -> tuple[torch.Tensor, mmap.mmap, bool]:
    """int32 host tensor over anonymous memory advised into huge pages and registered with CUDA."""
    m = mmap.mmap(-1, nbytes)
    huge = hasattr(mmap, "MADV_HUGEPAGE")
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    arr = np.frombuffer(m, dtype=np.int32)
    arr[:] = 1  # fault every page in
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    err = torch.cuda.cudart().cudaHostRegister(addr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    return torch.from_numpy(arr), m, huge


def anon_huge_kib() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def concurrent(gpu_read, nbytes: int, cpu_repeats: int) -> tuple[float, float]:
    """(CPU GB/s, GPU GB/s) with the CPU pool reading 1 GiB ``cpu_repeats`` times (best rate) while the GPU
    repeats ``gpu_read`` (``nbytes`` each) for as long as the CPU reads."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(cpu=_core.read_bandwidth(1 << 30, cpu_repeats)))
    torch.cuda.synchronize()
    start, reads = time.perf_counter(), 0
    thread.start()
    while thread.is_alive():
        for _ in range(4):
            gpu_read()
        reads += 4
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    thread.join()
    return result["cpu"] / 1e9, reads * nbytes / elapsed / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="bytes read per measurement, MiB")
    p.add_argument("--programs", type=int, nargs="+", default=[64, 132, 264, 528, 1056, 2112])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    nbytes = args.mib << 20
    n = nbytes // 4
    dst = torch.empty(n, dtype=torch.int32, device="cuda")
    sources = {"torch pinned": torch.ones(n, dtype=torch.int32, pin_memory=True)}
    before = anon_huge_kib()
    reg, _keep, huge = registered_huge(nbytes)
    print(f"registered buffer: MADV_HUGEPAGE {'asked' if huge else 'unavailable'}, AnonHugePages grew "
          f"{(anon_huge_kib() - before) >> 10} MiB of {args.mib}; is_pinned() = {reg.is_pinned()}")
    sources["registered (huge pages)"] = reg
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        thp = "unknown"
    print(f"transparent huge pages: {thp}")
    rows = []
    for name, src in sources.items():
        t = median_event_seconds(lambda src=src: dst.copy_(src, non_blocking=True), args.repeats)
        rows.append((name, "copy engine", "-", "-", nbytes / t / 1e9))
        for programs in args.programs:
            for warps in args.warps:
                def run(src=src, programs=programs, warps=warps):
                    _read_kernel[(programs,)](src, dst, n, PROGRAMS=programs, BLOCK=BLOCK, num_warps=warps)
                t = median_event_seconds(run, args.repeats)
                rows.append((name, "kernel loads", programs, warps, nbytes / t / 1e9))
                if not torch.equal(dst[:1024], src[:1024].to("cuda")):
                    raise RuntimeError("the copy kernel moved the wrong bytes")
    src = sources["torch pinned"]
    kernel = lambda: _read_kernel[(264,)](src, dst, n, PROGRAMS=264, BLOCK=BLOCK, num_warps=8)  # noqa: E731
    engine = lambda: dst.copy_(src, non_blocking=True)  # noqa: E731
    cpu_alone = _core.read_bandwidth(1 << 30, 5) / 1e9
    both = {"kernel loads (264 programs, 8 warps)": concurrent(kernel, nbytes, 30),
            "copy engine": concurrent(engine, nbytes, 30)}
    print(f"\nGPU reads of {args.mib} MiB of host memory, {torch.cuda.get_device_name()}")
    print("| host memory | reader | programs | warps | GB/s |")
    print("|---|---|---|---|---|")
    for name, how, programs, warps, gbps in rows:
        print(f"| {name} | {how} | {programs} | {warps} | {gbps:.1f} |")
    print(f"\nBoth links at once (CPU pool alone: {cpu_alone:.1f} GB/s)")
    print("| GPU reader | CPU GB/s | GPU GB/s | sum GB/s |")
    print("|---|---|---|---|")
    for how, (cpu, gpu) in both.items():
        print(f"| {how} | {cpu:.1f} | {gpu:.1f} | {cpu + gpu:.1f} |")


if __name__ == "__main__":
    main()
