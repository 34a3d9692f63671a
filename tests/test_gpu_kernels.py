"""The GPU weight layout and the Triton INT4/INT8 MoE and linear kernels (krasis.kernels).

The layout tests run in process on the CPU. The kernel checks live in ``interpret_kernels.py``: without a GPU
they run on tiny shapes through the Triton interpreter in one subprocess (it must be switched on before the
kernels are decorated), each asserted by its own test here; on a GPU (-m gpu) the same checks run on CUDA with
DeepSeek-V2-Lite shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the kernels need Triton (it ships with torch's Linux wheels)")

from interpret_kernels import (  # noqa: E402
    CHECK_NAMES,
    LARGE,
    checks,
    random_experts,
    random_routing,
    reference_moe,
    rel_norm_err,
)

from krasis import _core  # noqa: E402
from krasis.kernels import (  # noqa: E402
    ExpertLayout,
    align_by_expert,
    dequantize_gpu,
    experts_from_cpu_layout,
    experts_from_layer_bytes,
    fused_moe,
    max_padded_pairs,
    quantize_cpu_layout,
    to_gpu_layout,
)

FORMATS = [(bits, group) for bits in (4, 8) for group in (32, 64, 128)]
HERE = Path(__file__).parent


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little")))


# --- the layout: torch quantiser, GPU repack and dequantisation against the Rust implementation ---


@pytest.mark.parametrize("bits,group", FORMATS)
def test_torch_quantiser_writes_the_rust_quantisers_bytes(bits, group):
    w = randn(40, 256) * 0.05
    w[3, :group] = 0  # a group of zeros: scale 0, every q = 0
    packed, scales = quantize_cpu_layout(w, bits, group)
    rust_packed, rust_scales = _core.quantize(w.numpy(), bits, group)
    np.testing.assert_array_equal(packed.numpy(), rust_packed)
    np.testing.assert_array_equal(scales.numpy(), rust_scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_torch_quantiser_rounds_half_steps_like_rust(bits):
    """Exact half steps round away from zero, and 0.5 - 1ulp rounds up too (Rust adds 0.5 in f32, truncates)."""
    qmax = 127 if bits == 8 else 7
    below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))
    row = [qmax, 0.5, -0.5, 1.5, -2.5, below_half, -below_half, 3.5] + [0.25] * 56
    w = torch.tensor([row, [-v for v in row]], dtype=torch.float32)
    packed, scales = quantize_cpu_layout(w, bits, 64)
    rust_packed, rust_scales = _core.quantize(w.numpy(), bits, 64)
    np.testing.assert_array_equal(packed.numpy(), rust_packed)
    np.testing.assert_array_equal(scales.numpy(), rust_scales)


@pytest.mark.parametrize("bits,group", FORMATS)
def test_gpu_layout_dequantises_to_the_rust_weights(bits, group):
    n, k = 48, 384
    q, s = _core.quantize(randn(n, k).numpy(), bits, group)
    m = to_gpu_layout(torch.from_numpy(q), torch.from_numpy(s), n, k, bits, group)
    assert m.qweight.shape == (q.shape[1], n) and m.qweight.dtype == torch.uint8
    assert m.scales.shape == (k // group, n) and m.scales.dtype == torch.float32
    np.testing.assert_array_equal(dequantize_gpu(m).numpy(), _core.dequantize(q, s, n, k, bits, group))


def test_gpu_layout_is_the_transpose_of_the_cpu_bytes():
    """No requantisation: row r of the GPU qweight is byte column r of the CPU rows, scales likewise."""
    q, s = _core.quantize(randn(24, 128).numpy(), 4, 32)
    m = to_gpu_layout(torch.from_numpy(q), torch.from_numpy(s), 24, 128, 4, 32)
    np.testing.assert_array_equal(m.qweight.numpy(), q.T)
    np.testing.assert_array_equal(m.scales.numpy(), s.T)


@pytest.mark.parametrize("bits,group", FORMATS)
def test_experts_built_from_quantized_matrices_are_the_store_bytes(bits, group):
    """The GPU's experts are the ExpertStore's own bytes: built from quantize() outputs they equal a layer of a
    store that quantised the same weights, padding included, so a store is copied to VRAM as it is."""
    e, h, i = 3, 128, 192 if group < 128 else 256
    store = _core.ExpertStore(1, e, h, i, bits, group, numa="off")
    gate, up, down = [], [], []
    for x in range(e):
        g, u, d = randn(i, h).numpy(), randn(i, h).numpy(), randn(h, i).numpy()
        store.set_expert(0, x, g, u, d)
        for parts, w in ((gate, g), (up, u), (down, d)):
            parts.append(tuple(torch.from_numpy(a) for a in _core.quantize(w, bits, group)))
    raw = torch.stack([torch.from_numpy(np.array(store.expert_view(0, x))) for x in range(e)])
    got = experts_from_layer_bytes(raw, store.layout(), bits, group)
    want = experts_from_cpu_layout(gate, up, down, bits, group)
    assert (got.num_experts, got.hidden, got.intermediate) == (e, h, i)
    assert got.layout == want.layout and torch.equal(got.raw, want.raw)


@pytest.mark.parametrize("bits,group", FORMATS)
@pytest.mark.parametrize("hidden,inter", [(128, 192), (2048, 1408), (7168, 2048)])
def test_expert_layout_matches_the_stores(bits, group, hidden, inter):
    if inter % group or hidden % group:
        pytest.skip("not a whole number of groups")
    store = _core.ExpertStore(1, 1, hidden, inter, bits, group, numa="off")
    assert ExpertLayout.from_store(store.layout(), bits, group) == ExpertLayout.of(hidden, inter, bits, group)


def test_a_store_layout_other_than_the_kernels_is_refused():
    layout = _core.ExpertStore(1, 1, 128, 128, 4, 64, numa="off").layout()
    layout["up"]["offset"] += 64
    with pytest.raises(ValueError, match="not the one the GPU kernels read"):
        ExpertLayout.from_store(layout, 4, 64)


@pytest.mark.gpu
def test_a_store_cuda_will_not_register_is_copied_into_pinned_memory(monkeypatch):
    import krasis.engine.store_memory as store_memory

    monkeypatch.setattr(store_memory, "_register", lambda address, nbytes: False)
    store = _core.ExpertStore(2, 2, 128, 128, 4, 64, numa="off")
    store.set_expert(1, 0, randn(128, 128).numpy(), randn(128, 128).numpy(), randn(128, 128).numpy())
    memory = store_memory.StoreMemory(store, ExpertLayout.from_store(store.layout(), 4, 64), torch.device("cuda"))
    assert memory.copied == 2
    for layer, (address, _) in zip(memory.layers, store.buffers(), strict=True):
        assert layer.raw.is_pinned() and layer.raw.data_ptr() != address
    assert torch.equal(memory.layers[1].raw[0], torch.from_numpy(np.array(store.expert_view(1, 0))))


@pytest.mark.gpu
def test_registered_host_memory_is_released_on_close():
    from krasis.engine.store_memory import StoreMemory

    store = _core.ExpertStore(1, 1, 128, 128, 4, 64, numa="off")
    table = torch.randn(1000, 256)
    memory = StoreMemory(store, ExpertLayout.from_store(store.layout(), 4, 64), torch.device("cuda"))
    assert memory.register(table) and table.is_pinned()
    memory.close()
    assert not table.is_pinned() and not memory.layers[0].raw.is_pinned()
    again = StoreMemory(store, ExpertLayout.from_store(store.layout(), 4, 64), torch.device("cuda"))
    assert again.copied == 0 and again.register(table), "registered again once released"
    again.close()


def test_the_store_memory_wraps_each_layer_in_place():
    """Off CUDA (the interpreter test mode) the host experts are the store's buffers too, nothing copied."""
    from krasis.engine.store_memory import StoreMemory

    store = _core.ExpertStore(3, 2, 128, 128, 4, 64, numa="off")
    store.set_expert(2, 1, randn(128, 128).numpy(), randn(128, 128).numpy(), randn(128, 128).numpy())
    memory = StoreMemory(store, ExpertLayout.from_store(store.layout(), 4, 64), torch.device("cpu"))
    assert [m.raw.data_ptr() for m in memory.layers] == [address for address, _ in store.buffers()]
    assert memory.nbytes == 3 * 2 * store.expert_nbytes
    assert torch.equal(memory.layers[2].raw[1], torch.from_numpy(np.array(store.expert_view(2, 1))))


def test_expert_matrix_views_dequantize_to_the_quantized_weights():
    e, h, i = 2, 128, 128
    gate = [quantize_cpu_layout(randn(i, h), 4, 64) for _ in range(e)]
    up = [quantize_cpu_layout(randn(i, h), 4, 64) for _ in range(e)]
    down = [quantize_cpu_layout(randn(h, i), 4, 64) for _ in range(e)]
    experts = experts_from_cpu_layout(gate, up, down, 4, 64)
    g, u, d = experts.matrices(1)
    for m, (q, s) in ((g, gate[1]), (u, up[1]), (d, down[1])):
        assert torch.equal(dequantize_gpu(m), torch.from_numpy(_core.dequantize(q.numpy(), s.numpy(), m.n, m.k, 4, 64)))


# --- routing pairs grouped by expert ---


def test_align_groups_every_routed_pair_once_by_expert_in_padded_blocks():
    t, k, e, bm = 37, 4, 8, 16
    ids = torch.rand(t, e).argsort(1)[:, :k]
    ids[torch.rand(t, k) < 0.25] = -1  # skipped pairs
    ids[5] = -1
    a = align_by_expert(ids, e, bm)
    p_max = max_padded_pairs(t * k, e, bm)
    assert a.sorted_pairs.shape == (p_max,) and a.block_expert.shape == (p_max // bm,)
    flat = ids.flatten()
    pairs = a.sorted_pairs.long()
    real = pairs[pairs < t * k]
    assert sorted(real.tolist()) == (flat >= 0).nonzero().flatten().tolist()  # each routed pair exactly once
    assert torch.all((pairs == t * k) | (pairs < t * k))  # the rest is the sentinel
    counts = torch.bincount(flat[flat >= 0], minlength=e)
    assert int(a.num_padded) == int(((counts + bm - 1) // bm * bm).sum())
    for b, expert in enumerate(a.block_expert.tolist()):
        rows = pairs[b * bm:(b + 1) * bm]
        rows = rows[rows < t * k]
        if expert < 0:
            assert b * bm >= int(a.num_padded) and rows.numel() == 0
        else:
            assert torch.all(flat[rows] == expert) and torch.all(rows.diff() > 0)  # stable: pair order kept


def test_align_with_every_pair_skipped_uses_no_block():
    a = align_by_expert(torch.full((3, 2), -1), 4, 16)
    assert torch.all(a.block_expert == -1) and torch.all(a.sorted_pairs == 6) and int(a.num_padded) == 0


# --- the kernels: CPU through the Triton interpreter ---


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Results of every kernel check run on tiny shapes under TRITON_INTERPRET=1 (one subprocess)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "interpret_kernels.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_kernel_under_triton_interpreter(interpreted, name):
    assert interpreted[name] == "ok", f"torch seed {interpreted['_seed']}:\n{interpreted[name]}"


# --- the kernels on CUDA, DeepSeek-V2-Lite shapes ---

GPU_CHECKS = checks(LARGE)


@pytest.fixture
def fresh_seed() -> int:
    """Seed torch (every device) from os.urandom: torch's default seed is the same in every process."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CHECKS))
def test_kernel_on_cuda(name, fresh_seed):
    GPU_CHECKS[name](torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4, 512])  # the one-program and the torch expert alignment
def test_fused_moe_runs_without_host_sync_and_inside_a_cuda_graph(tokens, fresh_seed):
    dev = torch.device("cuda")
    experts = random_experts(LARGE, 4, 128, dev)
    x = torch.randn(tokens, LARGE.hidden, device=dev).to(torch.bfloat16)
    weights, ids = random_routing(tokens, LARGE, dev)
    ids[0, 0] = -1
    fused_moe(x, experts, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, experts, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, experts, weights, ids)
    new_x = torch.randn(x.shape, device=dev).to(torch.bfloat16)
    new_w, new_ids = random_routing(tokens, LARGE, dev)
    x.copy_(new_x)
    weights.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    assert rel_norm_err(y, reference_moe(x, experts, weights, ids)) < 2e-2


@pytest.mark.gpu
def test_the_expert_store_is_registered_for_dma_in_place():
    """The GPU engine's host experts are the store's own memory, page-locked, not a copy; a copy to VRAM gives
    the store's bytes."""
    from krasis.engine.store_memory import StoreMemory

    e, h, i, bits, group = 4, 256, 384, 4, 128
    store = _core.ExpertStore(2, e, h, i, bits, group, numa="off")
    for layer in range(2):
        for x in range(e):
            store.set_expert(layer, x, randn(i, h).numpy(), randn(i, h).numpy(), randn(h, i).numpy())
    memory = StoreMemory(store, ExpertLayout.from_store(store.layout(), bits, group), torch.device("cuda"))
    assert memory.copied == 0
    for layer, (address, _) in zip(memory.layers, store.buffers(), strict=True):
        assert layer.raw.data_ptr() == address and layer.raw.is_pinned()
    on_gpu = memory.layers[1].to("cuda", non_blocking=True)
    want = torch.stack([torch.from_numpy(np.array(store.expert_view(1, x))) for x in range(e)])
    assert torch.equal(on_gpu.raw.cpu(), want)
    memory.close()
