"""krasis._core.QuantMatrix: every SIMD path against a float64 reference and against scalar."""

import numpy as np
import pytest
from measures import rand_f32 as rand
from measures import rel_err_f64 as rel_err

from krasis import _core

PATHS = ["avx512", "avx2", "scalar"]








@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_forward_matches_reference(simd, bits, group_size, m):
    n, k = 96, 512
    w = rand(n, k)
    qm = _core.QuantMatrix.from_float(w, bits, group_size)
    q, s = _core.quantize(w, bits, group_size)
    deq = _core.dequantize(q, s, n, k, bits, group_size).astype(np.float64)
    x = rand(m, k)
    ref = x.astype(np.float64) @ deq.T
    yi = qm.forward(x, act_int8=True)
    yf = qm.forward(x, act_int8=False)
    assert yi.shape == (m, n) and yi.dtype == np.float32
    assert rel_err(yi, ref) < 1e-2
    assert rel_err(yf, ref) < 1e-4
    _core.set_simd_path("scalar")
    assert rel_err(yi, qm.forward(x, act_int8=True).astype(np.float64)) < 1e-5
    assert rel_err(yf, qm.forward(x, act_int8=False).astype(np.float64)) < 1e-5


def test_constructor_from_parts_and_properties():
    w = rand(64, 256)
    q, s = _core.quantize(w, 4, 64)
    a = _core.QuantMatrix(q, s, 64, 256, 4, 64)
    b = _core.QuantMatrix.from_float(w, 4, 64)
    x = rand(2, 256)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    assert (a.n, a.k, a.bits, a.group_size) == (64, 256, 4, 64)
    assert a.nbytes == q.nbytes + s.nbytes


def test_forward_rejects_bad_input():
    qm = _core.QuantMatrix.from_float(rand(32, 128), 8, 128)
    with pytest.raises(ValueError):
        qm.forward(rand(2, 64))
    with pytest.raises(TypeError):
        qm.forward(rand(2, 128).astype(np.float64))
    with pytest.raises(ValueError):
        qm.forward(rand(128, 4).T)
    with pytest.raises(TypeError):
        qm.forward(rand(128))
    with pytest.raises(ValueError):
        _core.QuantMatrix(np.zeros(10, np.uint8), np.zeros(1, np.float32), 32, 128, 8, 128)


def test_forced_path_errors():
    with pytest.raises(ValueError):
        _core.set_simd_path("sse9")
    for p in PATHS:
        if p not in _core.supported_simd_paths():
            with pytest.raises(ValueError):
                _core.set_simd_path(p)
    _core.set_simd_path(None)
    assert _core.simd_path() in _core.supported_simd_paths()
