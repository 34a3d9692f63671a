"""Time one source tree's routed-expert kernels, to compare two trees (e.g. two expert layouts) in one GPU call.

    python3 benchmarks/moe_tree_ab.py PYTHON_DIR LABEL

PYTHON_DIR is the tree's ``python`` directory (imported first). The experts are built with that tree's
``experts_from_cpu_layout`` (DeepSeek-V2-Lite shapes, INT4 group 128, 64 experts), so each tree runs in its own
layout; ``fused_moe`` with its default dispatch is timed at 1, 2 tokens (the matrix-vector kernels) and 512, 4,096,
16,384 tokens (the grouped GEMM): median of 30 (10) calls with the L2 flushed before each.
"""

import sys

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402

from krasis.kernels import experts_from_cpu_layout, fused_moe, quantize_cpu_layout  # noqa: E402

H, I, E, K = 2048, 1408, 64, 6


def matrices(n: int, k: int) -> list:
    return [quantize_cpu_layout(torch.randn(n, k, device="cuda") / k**0.5, 4, 128) for _ in range(E)]


def main() -> None:
    # imported after krasis, which is then already the tree's: moe_kernels puts this checkout's python first
    from moe_kernels import median_ms

    torch.manual_seed(0)
    experts = experts_from_cpu_layout(matrices(I, H), matrices(I, H), matrices(H, I), 4, 128)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for t in (1, 2, 512, 4096, 16384):
        x = torch.randn(t, H, device="cuda").to(torch.bfloat16)
        ids = torch.rand(t, E, device="cuda").argsort(dim=1)[:, :K]
        w = torch.rand(t, K, device="cuda")
        ms = median_ms(lambda x=x, w=w, ids=ids: fused_moe(x, experts, w, ids), 30 if t < 100 else 10, flush)
        print(f"{sys.argv[2]} T={t:>6} {ms * 1e3:10.1f} us")


if __name__ == "__main__":
    main()
