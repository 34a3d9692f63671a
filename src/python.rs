//! PyO3 bindings: type conversion and Python exceptions only; the logic lives in the other modules.
use pyo3::prelude::*;

/// The SIMD path the kernels use on this CPU ("avx512", "avx2" or "scalar").
#[pyfunction]
fn simd_path() -> &'static str {
    crate::simd::detect().name()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(simd_path, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
