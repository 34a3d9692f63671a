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


def test_pool_works_in_a_forked_child():
    import os

    if not hasattr(os, "fork"):
        import pytest

        pytest.skip("no fork on this platform")
    rng = np.random.default_rng()
    qm = _core.QuantMatrix.from_float(rng.standard_normal((64, 128)).astype(np.float32), 8, 64)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    want = qm.forward(x)  # the parent's pool exists now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not hang on the parent's (absent) worker threads
        ok = np.allclose(qm.forward(x), want, rtol=1e-5, atol=1e-5)
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1" and status == 0


def test_caller_affinity_is_restored():
    import os

    if not hasattr(os, "sched_getaffinity"):
        import pytest

        pytest.skip("no sched_getaffinity")
    before = os.sched_getaffinity(0)
    store = _core.ExpertStore(1, 2, 128, 128, 4, 64)
    rng = np.random.default_rng()
    x = rng.standard_normal((1, 128)).astype(np.float32)
    store.forward(0, x, np.array([[0, 1]]), np.array([[0.5, 0.5]], np.float32))
    _core.QuantMatrix.from_float(rng.standard_normal((64, 128)).astype(np.float32), 4, 64).forward(x)
    assert os.sched_getaffinity(0) == before
