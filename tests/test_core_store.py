"""krasis._core.ExpertStore: fused routed-expert forward against a float64 torch/numpy reference."""

import numpy as np
import pytest
from measures import RNG
from measures import rand_f32 as rand
from measures import rel_err_f64 as rel_err

from krasis import _core

H, I, E, L = 256, 384, 8, 2








def filled_store(bits, group_size):
    store = _core.ExpertStore(L, E, H, I, bits, group_size)
    for layer in range(L):
        for e in range(E):
            store.set_expert(layer, e, rand(I, H, scale=0.1), rand(I, H), rand(H, I))
    return store


def dequantized_expert(store, layer, e):
    raw = np.asarray(store.expert_view(layer, e))
    lay = store.layout()
    out = []
    for name in ("gate", "up", "down"):
        m = lay[name]
        q = raw[m["offset"] : m["offset"] + m["weights_nbytes"]]
        s = raw[m["scales_offset"] : m["scales_offset"] + m["scales_nbytes"]].view(np.float32)
        out.append(_core.dequantize(q, s, m["n"], m["k"], store.bits, store.group_size).astype(np.float64))
    return out


def reference(store, layer, x, ids, w):
    y = np.zeros((x.shape[0], H))
    cache = {}
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in cache:
                cache[e] = dequantized_expert(store, layer, e)
            g, u, d = cache[e]
            xt = x[t].astype(np.float64)
            gv, uv = g @ xt, u @ xt
            h = gv / (1 + np.exp(-gv)) * uv
            y[t] += w[t, j] * (d @ h)
    return y


STORES = {}


def store_for(bits, group_size):
    key = (bits, group_size)
    if key not in STORES:
        STORES[key] = filled_store(bits, group_size)
    return STORES[key]


@pytest.mark.parametrize("bits,group_size", [(4, 128), (8, 128), (4, 32), (8, 64)])
@pytest.mark.parametrize("m", [1, 4, 19])
def test_forward_matches_reference(simd, bits, group_size, m):
    store = store_for(bits, group_size)
    k = 3
    x = rand(m, H)
    ids = np.stack([RNG.choice(E, k, replace=False) for _ in range(m)]).astype(np.int64)
    w = RNG.random((m, k)).astype(np.float32)
    ref = reference(store, 1, x, ids, w)
    yi = store.forward(1, x, ids, w, act_int8=True)
    yf = store.forward(1, x, ids.astype(np.int32), w, act_int8=False)
    assert yi.shape == (m, H) and yi.dtype == np.float32
    assert rel_err(yi, ref) < 1e-2
    assert rel_err(yf, ref) < 1e-4
    _core.set_simd_path("scalar")
    assert rel_err(yi, store.forward(1, x, ids, w, act_int8=True).astype(np.float64)) < 1e-4


def test_torch_reference_bf16_weights():
    torch = pytest.importorskip("torch")
    store = _core.ExpertStore(1, 4, H, I, 8, 64)
    mats = {}
    for e in range(4):
        g, u, d = (torch.randn(I, H) * 0.1).bfloat16(), torch.randn(I, H).bfloat16(), torch.randn(H, I).bfloat16()
        store.set_expert(0, e, *(t.view(torch.uint16).numpy() for t in (g, u, d)))
        mats[e] = [torch.from_numpy(a) for a in dequantized_expert(store, 0, e)]
    x = torch.randn(2, H)
    ids = torch.tensor([[0, 3], [2, 1]])
    w = torch.rand(2, 2)
    ref = torch.zeros(2, H, dtype=torch.float64)
    for t in range(2):
        for j in range(2):
            g, u, d = mats[int(ids[t, j])]
            xt = x[t].double()
            ref[t] += w[t, j].double() * (d @ (torch.nn.functional.silu(g @ xt) * (u @ xt)))
    y = store.forward(0, x.numpy(), ids.numpy(), w.numpy(), act_int8=False)
    assert rel_err(y, ref.numpy()) < 1e-4


def test_quantized_parts_and_bytes_round_trip():
    store = _core.ExpertStore(1, 3, H, I, 4, 64, numa="off")
    g, u, d = rand(I, H), rand(I, H), rand(H, I)
    store.set_expert(0, 0, g, u, d)
    parts = []
    for a in (g, u, d):
        parts += list(_core.quantize(a, 4, 64))
    store.set_expert_quantized(0, 1, *parts)
    np.testing.assert_array_equal(store.expert_view(0, 0), store.expert_view(0, 1))
    store.set_expert_bytes(0, 2, np.array(store.expert_view(0, 0)))
    np.testing.assert_array_equal(store.expert_view(0, 0), store.expert_view(0, 2))
    view = store.expert_view(0, 0)
    assert view.nbytes == store.expert_nbytes and not view.flags.writeable
    bufs = store.buffers()
    assert len(bufs) == 1 and bufs[0][1] == 3 * store.expert_nbytes and bufs[0][0] % 4096 == 0
    assert (store.num_layers, store.num_experts, store.hidden, store.intermediate) == (1, 3, H, I)
    assert (store.bits, store.group_size, store.numa) == (4, 64, "off")


def test_view_keeps_store_alive():
    store = _core.ExpertStore(1, 2, H, I, 8, 128)
    store.set_expert(0, 1, rand(I, H), rand(I, H), rand(H, I))
    view = store.expert_view(0, 1)
    copy = np.array(view)
    del store
    np.testing.assert_array_equal(view, copy)


def test_bad_inputs_raise():
    store = store_for(4, 128)
    x = rand(2, H)
    ids = np.array([[0, 1], [2, 3]])
    w = rand(2, 2)
    with pytest.raises(ValueError):
        store.forward(0, x, np.array([[0, E], [1, 2]]), w)  # id out of range
    with pytest.raises(ValueError):
        store.forward(0, x, np.array([[0, -2], [1, 2]]), w)  # negative ids other than -1 (skip)
    with pytest.raises(ValueError):
        store.forward(L, x, ids, w)
    with pytest.raises(ValueError):
        store.forward(0, rand(2, H + 64), ids, w)
    with pytest.raises(ValueError):
        store.forward(0, x, ids, rand(2, 3))
    with pytest.raises(TypeError):
        store.forward(0, x.astype(np.float64), ids, w)
    with pytest.raises(TypeError):
        store.forward(0, x, ids.astype(np.float32), w)
    with pytest.raises(ValueError):
        store.forward(0, rand(H, 2).T, ids, w)  # non-contiguous
    with pytest.raises(ValueError):
        store.set_expert(0, E, rand(I, H), rand(I, H), rand(H, I))
    with pytest.raises(ValueError):
        store.set_expert(0, 0, rand(I, H + 64), rand(I, H), rand(H, I))
    with pytest.raises(ValueError):
        store.set_expert_bytes(0, 0, np.zeros(10, np.uint8))
    with pytest.raises(ValueError):
        _core.ExpertStore(1, 2, 100, I, 4, 64)
    with pytest.raises(ValueError):
        _core.ExpertStore(1, 2, H, I, 4, 64, numa="maybe")


def test_forward_alternating_shapes_and_modes_reuses_buffers_correctly(simd):
    # The forward keeps per-thread buffers between calls; alternating shapes, group sizes,
    # activation modes and token counts must not leak anything from one call into the next.
    a = store_for(4, 128)
    b = _core.ExpertStore(1, 4, 128, 192, 8, 64)
    for e in range(4):
        b.set_expert(0, e, rand(192, 128, scale=0.1), rand(192, 128), rand(128, 192))
    cases = []
    for store, layer, h, m in [(a, 1, H, 1), (b, 0, 128, 1), (a, 0, H, 3), (b, 0, 128, 2)]:
        k = 2
        ne = 4 if store is b else E
        x = rand(m, h)
        ids = np.stack([RNG.choice(ne, k, replace=False) for _ in range(m)]).astype(np.int64)
        w = RNG.random((m, k)).astype(np.float32)
        cases.append((store, layer, x, ids, w))
    first = [[s.forward(layer, x, ids, w, act_int8=ai) for ai in (True, False)] for s, layer, x, ids, w in cases]
    for _ in range(2):
        for (s, layer, x, ids, w), want in zip(reversed(cases), reversed(first), strict=True):
            for ai, y in zip((True, False), want, strict=True):
                np.testing.assert_array_equal(s.forward(layer, x, ids, w, act_int8=ai), y)


def test_forward_skips_pairs_marked_minus_one(simd):
    store = store_for(4, 128)
    x = rand(3, H)
    ids = np.stack([RNG.choice(E, 3, replace=False) for _ in range(3)]).astype(np.int64)
    w = RNG.random((3, 3)).astype(np.float32)
    skipped = ids.copy()
    skipped[:, 1] = -1
    zero_w = w.copy()
    zero_w[:, 1] = 0.0
    want = store.forward(1, x, ids, zero_w)
    assert rel_err(store.forward(1, x, skipped, w), want.astype(np.float64)) < 1e-6
    assert not store.forward(1, x, np.full_like(ids, -1), w).any()


def _link_buffers(k):
    """Host-side stand-ins for a decode graph's mapped buffers: staged row, output row, flags, residency, ids."""
    return (np.zeros((1, H + 2 * k + 4), np.float32), np.zeros((1, H), np.float32), np.zeros(3, np.int64),
            np.full((L, E), -1, np.int64), np.zeros((1, k), np.int64))


def test_serve_decode_graph_answers_a_staged_layer_with_its_non_resident_experts():
    store = store_for(4, 128)
    staged, out, flags, resident, ids_out = _link_buffers(3)
    x, ids, w = rand(1, H), np.array([[5, 1, 7]]), RNG.random((1, 3)).astype(np.float32)
    staged[0, :H], staged[0, H:H + 3], staged[0, H + 3:H + 6] = x[0], w[0], ids[0]
    flags[0] = 1  # the GPU has staged handshake 1
    resident[1, 7] = 0  # expert 7 of layer 1 is the GPU's
    pairs, claimed, cpu_seconds, wait_seconds, *_ = store.serve_decode_graph(staged, out, flags, [1], resident,
                                                                             ids_out)
    assert (pairs, claimed, int(flags[1]), ids_out.tolist()) == (2, 0, 1, [[5, 1, 7]])
    want = store.forward(1, x, np.array([[5, 1, -1]]), w)
    assert rel_err(out, want.astype(np.float64)) < 1e-6
    assert cpu_seconds > 0 and wait_seconds >= 0


def test_serve_decode_graph_leaves_the_pairs_the_gpu_claimed_to_it():
    store = store_for(4, 128)
    staged, out, flags, resident, ids_out = _link_buffers(3)
    x, ids, w = rand(1, H), np.array([[5, 1, 7]]), RNG.random((1, 3)).astype(np.float32)
    staged[0, :H], staged[0, H:H + 3], staged[0, H + 3:H + 6] = x[0], w[0], ids[0]
    staged[0, H + 6:H + 9] = [0.0, 1.0, 0.0]  # the GPU prefetched expert 1
    flags[0] = 1
    pairs, claimed, *_ = store.serve_decode_graph(staged, out, flags, [1], resident, ids_out, claims=True)
    assert (pairs, claimed, ids_out.tolist()) == (2, 1, [[5, 1, 7]])
    want = store.forward(1, x, np.array([[5, -1, 7]]), w)
    assert rel_err(out, want.astype(np.float64)) < 1e-6


def test_serve_decode_graph_reads_the_hinted_experts_of_the_next_layer_ahead():
    store = store_for(4, 128)
    x, ids, w = rand(1, H), np.array([[5, 1, 7]]), RNG.random((1, 3)).astype(np.float32)

    def serve(hints):
        staged, out, flags, resident, _ = _link_buffers(3)
        staged[0, :H], staged[0, H:H + 3], staged[0, H + 3:H + 6] = x[0], w[0], ids[0]
        flags[0] = 2  # both layers staged (with the same row)
        resident[1, 1] = 0  # layer 1's expert 1 is the GPU's
        return store.serve_decode_graph(staged, out, flags, [0, 1], resident, np.zeros((2, 3), np.int64),
                                        hints=hints)

    # written during handshake 1: layer 1's likely experts 5, 7, 2; of them 5 and 7 went to the CPU
    # (read as hinted, though layer 1 was staged already: nothing is read once the layer is staged)
    pairs, _, _, _, hinted, used, nbytes, *_ = serve(np.array([1, 5, 7, 2, -1], dtype=np.int64))
    assert (pairs, hinted, used, nbytes) == (5, 3, 2, 0)
    assert serve(np.array([7, 5, 7, 2, -1], dtype=np.int64))[4:7] == (0, 0, 0), "hints of another handshake"


def _prefetch_spec(predictions, src, staging, flags):
    """``serve_decode_graph``'s prefetch description for host copies: src uint8 [layers, experts, n], staging uint8
    [2, slots, n], the copy flags flags[3] and flags[4]."""
    n = src.shape[2]
    return (predictions, [src[i].ctypes.data for i in range(src.shape[0])], n,
            (staging[0].ctypes.data, staging[1].ctypes.data), n, n, (flags.ctypes.data + 24, flags.ctypes.data + 32),
            None)


def test_serve_decode_graph_copies_the_predicted_experts_of_the_next_layer():
    store = store_for(4, 128)
    staged, out, flags, resident, _ = _link_buffers(3)
    flags = np.zeros(5, np.int64)
    staged[0, H:H + 3], staged[0, H + 3:H + 6] = [0.5, 0.3, 0.2], [5, 1, 7]
    flags[0] = 2  # both layers staged (with the same row)
    src = RNG.integers(0, 255, size=(L, E, 64), dtype=np.uint8)
    staging = np.zeros((2, 2, 64), np.uint8)
    predictions = np.zeros((2, 3), np.int64)
    predictions[1] = [1, 3, -1]  # written during handshake 1 for MoE layer index 1 (odd): expert 3, one slot empty
    *_, prefetched, _ = store.serve_decode_graph(staged, out, flags, [0, 1], resident, np.zeros((2, 3), np.int64),
                                                 claims=True, prefetch=_prefetch_spec(predictions, src, staging, flags))
    assert prefetched == 1
    assert np.array_equal(staging[1, 0], src[1, 3]), "layer 1's expert 3 in the odd slots' first"
    assert not staging[0].any() and not staging[1, 1].any()
    assert flags[4] == 1 and flags[3] == 0, "the odd copies' flag says handshake 1's copies landed"


def test_serve_decode_graph_times_out_when_the_gpu_stages_nothing():
    staged, out, flags, resident, ids_out = _link_buffers(2)
    with pytest.raises(RuntimeError, match="did not stage decode handshake 1"):
        store_for(4, 128).serve_decode_graph(staged, out, flags, [0], resident, ids_out, timeout_s=0.05)


def test_serve_decode_graph_refuses_wrong_buffers():
    store = store_for(4, 128)
    staged, out, flags, resident, ids_out = _link_buffers(2)
    with pytest.raises(TypeError, match="flags must be a numpy int64"):
        store.serve_decode_graph(staged, out, flags.astype(np.float32), [0], resident, ids_out)
    with pytest.raises(ValueError, match="resident"):
        store.serve_decode_graph(staged, out, flags, [0], resident[:1], ids_out)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        store.serve_decode_graph(staged, out, flags, [5], resident, ids_out)
    with pytest.raises(ValueError, match="staged needs"):
        store.serve_decode_graph(staged[:, :H], out, flags, [0], resident, ids_out)
    with pytest.raises(ValueError, match="staged needs"):  # claims take k more values
        store.serve_decode_graph(staged[:, :H + 4], out, flags, [0], resident, ids_out, claims=True)
    with pytest.raises(ValueError, match="hints must hold"):
        store.serve_decode_graph(staged, out, flags, [0], resident, ids_out, hints=np.zeros(1, np.int64))
    spec = _prefetch_spec(np.zeros((2, 2), np.int64), np.zeros((L, E, 16), np.uint8), np.zeros((2, 1, 16), np.uint8),
                          np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="a prefetch needs claims"):
        store.serve_decode_graph(staged, out, flags, [0], resident, ids_out, prefetch=spec)
