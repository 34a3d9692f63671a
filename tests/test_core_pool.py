"""krasis._core thread pool and bandwidth helpers."""

import numpy as np

from krasis import _core


def test_threads_can_be_changed_and_results_stay_the_same():
    rng = np.random.default_rng()
    qm = _core.QuantMatrix.from_float(rng.standard_normal((64, 256)).astype(np.float32), 4, 128)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    before = _core.num_threads()
    y1 = qm.forward(x)
    _core.set_num_threads(3)
    assert _core.num_threads() == 3
    y3 = qm.forward(x)
    _core.set_num_threads(before)
    assert _core.num_threads() == before
    np.testing.assert_allclose(y1, y3, rtol=1e-5, atol=1e-5)


def test_dispatch_and_bandwidth_are_measurable():
    assert 0 < _core.pool_dispatch_overhead(1000) < 0.01
    assert _core.read_bandwidth(1 << 24, 2) > 1e8
    assert _core.num_numa_nodes() >= 1
