"""krasis._core quantisation: formats, layout, round trips and input checking."""

import numpy as np
import pytest

from krasis import _core

RNG = np.random.default_rng()


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_round_trip_within_half_step(bits, group_size):
    n, k = 48, 256
    w = rand(n, k)
    q, s = _core.quantize(w, bits, group_size)
    assert q.dtype == np.uint8 and q.shape == (n, k * bits // 8)
    assert s.dtype == np.float32 and s.shape == (n, k // group_size)
    d = _core.dequantize(q, s, n, k, bits, group_size)
    step = np.repeat(s, group_size, axis=1)
    assert np.all(np.abs(d - w) <= 0.5001 * step + 1e-7)
    qmax = 127 if bits == 8 else 7
    np.testing.assert_allclose(s, np.abs(w).reshape(n, -1, group_size).max(-1) / qmax, rtol=1e-6)


def test_documented_int4_packing():
    """Byte j of each 32-byte block holds value j (low nibble) and value j+32 (high), stored as q+8."""
    n, k, g = 3, 128, 64
    w = rand(n, k)
    q, s = _core.quantize(w, 4, g)
    lo = (q & 0x0F).astype(np.int32) - 8
    hi = (q >> 4).astype(np.int32) - 8
    vals = np.concatenate([lo.reshape(n, -1, 32), hi.reshape(n, -1, 32)], axis=2).reshape(n, k)
    np.testing.assert_allclose(vals * np.repeat(s, g, axis=1), _core.dequantize(q, s, n, k, 4, g))
    q8, s8 = _core.quantize(w, 8, g)
    np.testing.assert_allclose(
        (q8.astype(np.int32) - 128) * np.repeat(s8, g, axis=1), _core.dequantize(q8, s8, n, k, 8, g)
    )


def test_half_inputs():
    torch = pytest.importorskip("torch")
    w = torch.randn(16, 128)
    bf = w.to(torch.bfloat16)
    q1, s1 = _core.quantize(bf.view(torch.uint16).numpy(), 8, 64, dtype="bf16")
    q2, s2 = _core.quantize(bf.float().numpy(), 8, 64)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(s1, s2)
    h = w.half().numpy()
    q3, s3 = _core.quantize(h, 4, 32)
    q4, s4 = _core.quantize(h.astype(np.float32), 4, 32)
    np.testing.assert_array_equal(q3, q4)
    np.testing.assert_array_equal(s3, s4)


def test_layout_is_documented_function():
    lay = _core.matrix_layout(1408, 2048, 4, 128)
    assert lay["weights_nbytes"] == 1408 * 1024
    assert lay["scales_offset"] % 64 == 0 and lay["scales_offset"] >= lay["weights_nbytes"]
    assert lay["scales_nbytes"] == 1408 * 16 * 4
    assert lay["nbytes"] % 64 == 0


def test_bad_inputs_raise():
    w = rand(8, 128)
    with pytest.raises(ValueError):
        _core.quantize(w, 3, 128)
    with pytest.raises(ValueError):
        _core.quantize(w, 4, 48)
    with pytest.raises(ValueError):
        _core.quantize(rand(8, 96), 4, 32)  # K not a multiple of 64
    with pytest.raises(TypeError):
        _core.quantize(w.astype(np.float64), 4, 128)
    with pytest.raises(TypeError):
        _core.quantize(rand(128), 4, 128)
    with pytest.raises(ValueError):
        _core.quantize(rand(128, 16).T, 4, 128)  # not contiguous
    with pytest.raises(ValueError):
        _core.quantize(w, 4, 128, dtype="bf16")  # float32 array but bf16 claimed
    q, s = _core.quantize(w, 4, 128)
    with pytest.raises(ValueError):
        _core.dequantize(q, s, 8, 256, 4, 128)
