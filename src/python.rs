//! PyO3 bindings: type conversion and Python exceptions only; the logic lives in the other modules.
use crate::decode_link::{serve as serve_link, Mailbox};
use crate::expert_copy::{Driver, ExpertCopies};
use crate::ggml_quants::{dequantize as dequantize_gguf_mat, GgmlType, GgufMatRef};
use crate::gguf_store::{GgufExpertStore, GgufTensor};
use crate::kernels::WeightRef;
use crate::matmul::{matmul, matmul_weight, QuantMatrix, WeightSrc};
use crate::moe::{RoutedExperts, SKIP};
use crate::numa::NumaPolicy;
use crate::pool;
use crate::quant::{dequantize as dequantize_mat, MatLayout, MatRef};
use crate::simd::{self, SimdPath};
use crate::store::ExpertStore;
use numpy::ndarray::ArrayView1;
use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyReadwriteArray2, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn verr(e: String) -> PyErr {
    PyValueError::new_err(e)
}

fn path() -> PyResult<SimdPath> {
    simd::active().map_err(verr)
}

/// The array's data as one slice (any number of dimensions); a non-contiguous array is a ValueError.
fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    let err = || {
        PyValueError::new_err(format!(
            "{name} must be C-contiguous (use np.ascontiguousarray)"
        ))
    };
    if !a.is_c_contiguous() {
        return Err(err());
    }
    a.as_slice().map_err(|_| err())
}

fn f32_2d<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray2<'py, f32>> {
    match obj.cast::<PyArray2<f32>>() {
        Ok(a) => Ok(a.readonly()),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be a 2-D numpy float32 array (torch: tensor.float().numpy())"
        ))),
    }
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape {want:?}, got {got:?}"
        )));
    }
    Ok(())
}

fn to_2d<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    PyArray1::from_vec(py, v).reshape([rows, cols])
}

/// The float weights of a 2-D array in one of the accepted dtypes, with (N, K).
enum FloatArray<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F16(PyReadonlyArray2<'py, half::f16>),
    U16(PyReadonlyArray2<'py, u16>),
}

impl<'py> FloatArray<'py> {
    fn extract(obj: &Bound<'py, PyAny>, dtype: Option<&str>, name: &str) -> PyResult<Self> {
        let a = if let Ok(a) = obj.cast::<PyArray2<f32>>() {
            FloatArray::F32(a.readonly())
        } else if let Ok(a) = obj.cast::<PyArray2<half::f16>>() {
            FloatArray::F16(a.readonly())
        } else if let Ok(a) = obj.cast::<PyArray2<u16>>() {
            FloatArray::U16(a.readonly())
        } else {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a 2-D numpy array of float32, float16, or uint16 holding bfloat16 bits"
            )));
        };
        let want = match &a {
            FloatArray::F32(_) => "f32",
            FloatArray::F16(_) => "f16",
            FloatArray::U16(_) => "bf16",
        };
        if let Some(d) = dtype {
            if d != want {
                return Err(PyValueError::new_err(format!(
                    "dtype={d:?} does not match the array (numpy dtype means {want:?}; bf16 is passed as uint16)"
                )));
            }
        }
        Ok(a)
    }
    fn shape(&self) -> (usize, usize) {
        let s = match self {
            FloatArray::F32(a) => a.shape().to_vec(),
            FloatArray::F16(a) => a.shape().to_vec(),
            FloatArray::U16(a) => a.shape().to_vec(),
        };
        (s[0], s[1])
    }
    fn src(&self, name: &str) -> PyResult<WeightSrc<'_>> {
        Ok(match self {
            FloatArray::F32(a) => WeightSrc::F32(contiguous(a, name)?),
            FloatArray::F16(a) => {
                let s = contiguous(a, name)?;
                // SAFETY: half::f16 is a repr(transparent) wrapper of u16, so the slice has the
                // same size, alignment and valid bit patterns as a [u16] of equal length.
                WeightSrc::F16(unsafe {
                    std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len())
                })
            }
            FloatArray::U16(a) => WeightSrc::Bf16(contiguous(a, name)?),
        })
    }
}

/// The SIMD path the kernels use now ("avx512", "avx2" or "scalar").
#[pyfunction]
fn simd_path() -> PyResult<&'static str> {
    Ok(path()?.name())
}

/// Force a SIMD path ("avx512", "avx2", "scalar"), or None for KRASIS_SIMD / auto-detection.
#[pyfunction]
#[pyo3(signature = (name=None))]
fn set_simd_path(name: Option<&str>) -> PyResult<()> {
    let p = name.map(SimdPath::parse).transpose().map_err(verr)?;
    simd::force(p).map_err(verr)
}

/// SIMD paths this CPU can run, fastest first.
#[pyfunction]
fn supported_simd_paths() -> Vec<&'static str> {
    SimdPath::all_supported()
        .into_iter()
        .map(|p| p.name())
        .collect()
}

/// Use n worker threads (re-creates the pool).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    pool::set_num_threads(n).map_err(verr)
}

/// Worker threads in the pool (creates it if needed).
#[pyfunction]
fn num_threads() -> usize {
    pool::global().num_threads()
}

/// NUMA nodes the pool's workers span.
#[pyfunction]
fn num_numa_nodes() -> usize {
    pool::global().num_nodes()
}

type Packed<'py> = (Bound<'py, PyArray2<u8>>, Bound<'py, PyArray2<f32>>);

/// Quantise a float matrix [N, K] -> (packed weights uint8 [N, K*bits/8], scales float32 [N, K/group_size]).
#[pyfunction]
#[pyo3(signature = (w, bits, group_size=128, dtype=None))]
fn quantize<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    bits: u32,
    group_size: usize,
    dtype: Option<&str>,
) -> PyResult<Packed<'py>> {
    let a = FloatArray::extract(w, dtype, "w")?;
    let (n, k) = a.shape();
    let layout = MatLayout::new(n, k, bits, group_size).map_err(verr)?;
    let src = a.src("w")?;
    let p = pool::global();
    let m = py.detach(|| QuantMatrix::quantize(&p, layout, src));
    Ok((
        to_2d(py, m.weights, n, layout.row_bytes())?,
        to_2d(py, m.scales, n, layout.groups_per_row())?,
    ))
}

fn bytes_of<'a>(
    a: &'a Bound<'_, PyAny>,
    name: &str,
) -> PyResult<numpy::PyReadonlyArrayDyn<'a, u8>> {
    a.cast::<numpy::PyArrayDyn<u8>>()
        .map(|x| x.readonly())
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy uint8 array")))
}

fn f32s_of<'a>(
    a: &'a Bound<'_, PyAny>,
    name: &str,
) -> PyResult<numpy::PyReadonlyArrayDyn<'a, f32>> {
    a.cast::<numpy::PyArrayDyn<f32>>()
        .map(|x| x.readonly())
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy float32 array")))
}

/// Dequantise packed weights and scales back to float32 [N, K].
#[pyfunction]
#[pyo3(signature = (qweight, scales, n, k, bits, group_size=128))]
fn dequantize<'py>(
    py: Python<'py>,
    qweight: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let layout = MatLayout::new(n, k, bits, group_size).map_err(verr)?;
    let (q, s) = (bytes_of(qweight, "qweight")?, f32s_of(scales, "scales")?);
    let m = MatRef::new(
        layout,
        contiguous(&q, "qweight")?,
        contiguous(&s, "scales")?,
    )
    .map_err(verr)?;
    let out = py.detach(|| dequantize_mat(&m));
    to_2d(py, out, n, k)
}

/// The GGML tensor types with a Krasis kernel: {name: (type id, block values, block bytes)}.
#[pyfunction]
fn gguf_supported_types<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for t in crate::ggml_quants::SUPPORTED {
        d.set_item(t.name(), (t.id(), t.block_size(), t.block_bytes()))?;
    }
    Ok(d)
}

fn gguf_mat<'a>(data: &'a [u8], ggml_type: u32, n: usize, k: usize) -> PyResult<GgufMatRef<'a>> {
    let ty = GgmlType::from_id(ggml_type).map_err(verr)?;
    GgufMatRef::new(ty, n, k, data).map_err(verr)
}

/// Dequantise a GGUF weight [N, K] given as its raw blocks (uint8, any shape, contiguous).
#[pyfunction]
fn gguf_dequantize<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    ggml_type: u32,
    n: usize,
    k: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let d = bytes_of(data, "data")?;
    let m = gguf_mat(contiguous(&d, "data")?, ggml_type, n, k)?;
    let out = py.detach(|| dequantize_gguf_mat(&m));
    to_2d(py, out, n, k)
}

/// y[M, N] = x[M, K] @ W^T with W a GGUF weight given as its raw blocks (read as stored).
#[pyfunction]
fn gguf_matmul<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    ggml_type: u32,
    n: usize,
    k: usize,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let d = bytes_of(data, "data")?;
    let m = gguf_mat(contiguous(&d, "data")?, ggml_type, n, k)?;
    let xa = f32_2d(x, "x")?;
    let rows = xa.shape()[0];
    check_shape("x", xa.shape(), &[rows, k])?;
    let xs = contiguous(&xa, "x")?;
    let (p, sp) = (pool::global(), path()?);
    let y = py.detach(|| matmul_weight(&p, sp, &WeightRef::Gguf(m), xs, false));
    to_2d(py, y, rows, n)
}

/// Best DRAM read rate in bytes/s, measured with the pool's workers over a buffer of nbytes.
#[pyfunction]
#[pyo3(signature = (nbytes=1usize << 30, repeats=5))]
fn read_bandwidth(py: Python<'_>, nbytes: usize, repeats: usize) -> f64 {
    let p = pool::global();
    py.detach(|| crate::bandwidth::read_bandwidth(&p, nbytes, repeats))
}

/// Mean seconds for one pool dispatch of an empty job (back-to-back calls).
#[pyfunction]
#[pyo3(signature = (iters=10000))]
fn pool_dispatch_overhead(py: Python<'_>, iters: usize) -> f64 {
    let p = pool::global();
    py.detach(|| p.dispatch_overhead(iters))
}

fn layout_dict<'py>(py: Python<'py>, l: &MatLayout, offset: usize) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("offset", offset)?;
    d.set_item("n", l.n)?;
    d.set_item("k", l.k)?;
    d.set_item("weights_nbytes", l.weights_nbytes())?;
    d.set_item("scales_offset", offset + l.scales_offset())?;
    d.set_item("scales_nbytes", l.scales_len() * 4)?;
    d.set_item("nbytes", l.nbytes())?;
    Ok(d)
}

/// Byte layout of one quantised matrix block (offsets relative to the block).
#[pyfunction]
#[pyo3(signature = (n, k, bits, group_size=128))]
fn matrix_layout<'py>(
    py: Python<'py>,
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let l = MatLayout::new(n, k, bits, group_size).map_err(verr)?;
    layout_dict(py, &l, 0)
}

#[pyclass(name = "QuantMatrix", module = "krasis._core")]
struct PyQuantMatrix {
    inner: QuantMatrix,
}

#[pymethods]
impl PyQuantMatrix {
    #[new]
    #[pyo3(signature = (qweight, scales, n, k, bits, group_size=128))]
    fn new(
        qweight: &Bound<'_, PyAny>,
        scales: &Bound<'_, PyAny>,
        n: usize,
        k: usize,
        bits: u32,
        group_size: usize,
    ) -> PyResult<Self> {
        let layout = MatLayout::new(n, k, bits, group_size).map_err(verr)?;
        let (q, s) = (bytes_of(qweight, "qweight")?, f32s_of(scales, "scales")?);
        let inner = QuantMatrix::from_parts(
            layout,
            contiguous(&q, "qweight")?.to_vec(),
            contiguous(&s, "scales")?.to_vec(),
        )
        .map_err(verr)?;
        Ok(PyQuantMatrix { inner })
    }

    /// Quantise a float matrix [N, K] (float32, float16, or uint16 bf16 bits).
    #[staticmethod]
    #[pyo3(signature = (w, bits, group_size=128, dtype=None))]
    fn from_float(
        py: Python<'_>,
        w: &Bound<'_, PyAny>,
        bits: u32,
        group_size: usize,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let a = FloatArray::extract(w, dtype, "w")?;
        let (n, k) = a.shape();
        let layout = MatLayout::new(n, k, bits, group_size).map_err(verr)?;
        let src = a.src("w")?;
        let p = pool::global();
        Ok(PyQuantMatrix {
            inner: py.detach(|| QuantMatrix::quantize(&p, layout, src)),
        })
    }

    /// y [M, N] = x [M, K] @ W^T.
    #[pyo3(signature = (x, act_int8=true))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        act_int8: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let xa = f32_2d(x, "x")?;
        let shape = xa.shape().to_vec();
        let l = self.inner.layout;
        if shape[1] != l.k || shape[0] == 0 {
            return Err(PyValueError::new_err(format!(
                "x must have shape [M >= 1, {}], got {shape:?}",
                l.k
            )));
        }
        let xs = contiguous(&xa, "x")?;
        let (p, sp) = (pool::global(), path()?);
        let w = self.inner.as_ref();
        let y = py.detach(|| matmul(&p, sp, &w, xs, act_int8));
        to_2d(py, y, shape[0], l.n)
    }

    #[getter]
    fn n(&self) -> usize {
        self.inner.layout.n
    }
    #[getter]
    fn k(&self) -> usize {
        self.inner.layout.k
    }
    #[getter]
    fn bits(&self) -> u32 {
        self.inner.layout.bits
    }
    #[getter]
    fn group_size(&self) -> usize {
        self.inner.layout.group
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }
    fn __repr__(&self) -> String {
        let l = self.inner.layout;
        format!(
            "QuantMatrix(n={}, k={}, bits={}, group_size={})",
            l.n, l.k, l.bits, l.group
        )
    }
}

#[pyclass(name = "ExpertStore", module = "krasis._core")]
struct PyExpertStore {
    inner: ExpertStore,
}

/// The checked inputs of a routed-expert forward (ExpertStore and GgufExpertStore): layer in range,
/// x float32 [M >= 1, hidden], expert ids [M, k] below num_experts, weights float32 [M, k].
struct MoeInputs<'py> {
    x: PyReadonlyArray2<'py, f32>,
    w: PyReadonlyArray2<'py, f32>,
    ids: Vec<usize>,
    m: usize,
}

impl<'py> MoeInputs<'py> {
    fn check(
        layer: usize,
        (num_layers, num_experts): (usize, usize),
        hidden: usize,
        x: &Bound<'py, PyAny>,
        expert_ids: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        if layer >= num_layers {
            return Err(PyValueError::new_err(format!(
                "layer {layer} out of range (num_layers={num_layers})"
            )));
        }
        let xa = f32_2d(x, "x")?;
        let m = xa.shape()[0];
        if m == 0 {
            return Err(PyValueError::new_err("x must have at least one row"));
        }
        check_shape("x", xa.shape(), &[m, hidden])?;
        let (ids, k) = ids_2d(expert_ids, m, num_experts)?;
        let wa = f32_2d(weights, "weights")?;
        check_shape("weights", wa.shape(), &[m, k])?;
        Ok(MoeInputs {
            x: xa,
            w: wa,
            ids,
            m,
        })
    }
}

/// What `serve_decode_graph` returns (`DecodeLinkArgs::serve`).
type ServeResult = (usize, usize, f64, f64, usize, usize, usize, usize, f64);

/// The mapped buffers and tables of a decode-graph handshake (`serve_decode_graph` of both stores),
/// checked: staged f32 (>= hidden + 2k values, + k with claims), out f32 (>= hidden), flags int64 [>= 2], resident int64
/// [num_layers, num_experts], ids_out int64 [>= len(layers), k], all C-contiguous.
struct DecodeLinkArgs<'py> {
    staged: PyReadwriteArrayDyn<'py, f32>,
    out: PyReadwriteArrayDyn<'py, f32>,
    flags: PyReadwriteArrayDyn<'py, i64>,
    resident: PyReadonlyArray2<'py, i64>,
    ids_out: PyReadwriteArray2<'py, i64>,
    hints: Option<numpy::PyReadonlyArrayDyn<'py, i64>>,
    prefetch: Option<(PyReadonlyArray2<'py, i64>, ExpertCopies)>,
    k: usize,
    claims: bool,
}

/// A prefetch's Python description: (predictions int64 [2, 1 + count], source address per MoE layer,
/// source stride, the two parities' staging addresses, staging stride, bytes per expert, the two flags'
/// addresses, the CUDA driver's (cuMemcpyHtoDAsync, cuStreamWriteValue64, cuCtxSetCurrent, context,
/// stream) or None for host copies).
type PrefetchSpec<'py> = (
    Bound<'py, PyAny>,
    Vec<usize>,
    usize,
    (usize, usize),
    usize,
    usize,
    (usize, usize),
    Option<(usize, usize, usize, usize, usize)>,
);

impl<'py> DecodeLinkArgs<'py> {
    #[allow(clippy::too_many_arguments)]
    fn check(
        staged: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
        flags: &Bound<'py, PyAny>,
        resident: &Bound<'py, PyAny>,
        ids_out: &Bound<'py, PyAny>,
        hints: Option<&Bound<'py, PyAny>>,
        prefetch: Option<&Bound<'py, PyAny>>,
        layers: &[usize],
        (num_layers, num_experts, hidden): (usize, usize, usize),
        claims: bool,
    ) -> PyResult<Self> {
        fn arr<'py, T: numpy::Element, D: numpy::ndarray::Dimension>(
            obj: &Bound<'py, PyAny>,
            name: &str,
            what: &str,
        ) -> PyResult<Bound<'py, numpy::PyArray<T, D>>> {
            let a = obj
                .cast::<numpy::PyArray<T, D>>()
                .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy {what} array")))?
                .clone();
            if !a.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "{name} must be C-contiguous"
                )));
            }
            Ok(a)
        }
        let ids_out = arr::<i64, numpy::Ix2>(ids_out, "ids_out", "2-D int64")?;
        let k = ids_out.shape()[1];
        let staged = arr::<f32, numpy::IxDyn>(staged, "staged", "float32")?;
        let out = arr::<f32, numpy::IxDyn>(out, "out", "float32")?;
        let flags = arr::<i64, numpy::IxDyn>(flags, "flags", "int64")?;
        let resident = arr::<i64, numpy::Ix2>(resident, "resident", "2-D int64")?;
        let hints = hints
            .map(|h| arr::<i64, numpy::IxDyn>(h, "hints", "int64"))
            .transpose()?;
        if hints.as_ref().is_some_and(|h| h.len() < 2) {
            return Err(PyValueError::new_err(
                "hints must hold the handshake number and at least one expert id",
            ));
        }
        if k == 0 || ids_out.shape()[0] < layers.len() {
            return Err(PyValueError::new_err(format!(
                "ids_out must be [>= {} layers, k >= 1], got {:?}",
                layers.len(),
                ids_out.shape()
            )));
        }
        let row = hidden + if claims { 3 } else { 2 } * k;
        if staged.len() < row || out.len() < hidden || flags.len() < 2 {
            return Err(PyValueError::new_err(format!(
                "staged needs >= {} values (got {}), out >= {hidden} (got {}), flags >= 2 (got {})",
                row,
                staged.len(),
                out.len(),
                flags.len()
            )));
        }
        check_shape("resident", resident.shape(), &[num_layers, num_experts])?;
        let prefetch = prefetch
            .map(|spec| -> PyResult<_> {
                let (predicted, src, src_stride, dst, dst_stride, nbytes, flags, driver): PrefetchSpec =
                    spec.extract()?;
                let predicted = arr::<i64, numpy::Ix2>(&predicted, "predicted", "2-D int64")?;
                if predicted.shape()[0] != 2 || predicted.shape()[1] < 2 || !claims || src.len() != num_layers {
                    return Err(PyValueError::new_err(format!(
                        "a prefetch needs claims, predictions of [2, 1 + count >= 2] (got {:?}) and a source per \
                         MoE layer ({num_layers}, got {})",
                        predicted.shape(),
                        src.len()
                    )));
                }
                let slots = predicted.shape()[1] - 1;
                // SAFETY: the addresses are those of live buffers that krasis.engine.prefetch keeps for
                // the Prefetcher's lifetime (this binding's documented contract), and the driver's
                // entry points were resolved from libcuda by name.
                let copies = unsafe {
                    let driver = driver
                        .map(|(m, w, c, ctx, st)| Driver::new(m, w, c, ctx, st))
                        .transpose()
                        .map_err(verr)?;
                    ExpertCopies::new(driver, src, src_stride, [dst.0, dst.1], dst_stride, nbytes, [flags.0, flags.1], slots, num_experts)
                }
                .map_err(verr)?;
                let predicted = predicted.try_readonly().map_err(|_| {
                    PyValueError::new_err("predicted must not be borrowed for writing elsewhere")
                })?;
                Ok((predicted, copies))
            })
            .transpose()?;
        if let Some(&l) = layers.iter().find(|&&l| l >= num_layers) {
            return Err(PyValueError::new_err(format!(
                "layer {l} out of range (num_layers={num_layers})"
            )));
        }
        Ok(DecodeLinkArgs {
            staged: staged.readwrite(),
            out: out.readwrite(),
            flags: flags.readwrite(),
            resident: resident.readonly(),
            ids_out: ids_out.readwrite(),
            hints: hints.map(|h| h.try_readonly()).transpose().map_err(|_| {
                PyValueError::new_err("hints must not be borrowed for writing elsewhere")
            })?,
            prefetch,
            k,
            claims,
        })
    }

    /// Run `decode_link::serve` with the GIL released: `store`'s forward runs the CPU experts (`act_int8` as
    /// in `forward`) and its `read_ahead` reads hinted ones ahead; returns (cpu_pairs, claimed_pairs,
    /// cpu_seconds, wait_seconds, hinted, hinted_used, bytes_read_ahead, prefetched, prefetch_seconds).
    fn serve<S: RoutedExperts + Sync>(
        mut self,
        py: Python<'_>,
        store: &S,
        layers: &[usize],
        (num_experts, hidden): (usize, usize),
        timeout_s: f64,
        act_int8: bool,
    ) -> PyResult<ServeResult> {
        let (pool, path) = (pool::global(), path()?);
        // Addresses cross into the GIL-free closure as integers; the borrows above keep them valid.
        let staged = self.staged.as_array_mut().as_mut_ptr() as usize;
        let out = self.out.as_array_mut().as_mut_ptr() as usize;
        let flags = self.flags.as_array_mut().as_mut_ptr() as usize;
        let hints = self
            .hints
            .as_mut()
            .map(|h| (h.as_array().as_ptr() as usize, h.len() - 1));
        let prefetch = self
            .prefetch
            .as_ref()
            .map(|(p, copies)| (p.as_array().as_ptr() as usize, p.shape()[1] - 1, copies));
        let resident = contiguous(&self.resident, "resident")?;
        let mut ids_out = self.ids_out.as_array_mut();
        let ids_out = ids_out
            .as_slice_mut()
            .ok_or_else(|| PyValueError::new_err("ids_out must be C-contiguous"))?;
        let (k, claims) = (self.k, self.claims);
        let timeout = std::time::Duration::from_secs_f64(timeout_s.max(0.0));
        let stats = py
            .detach(|| {
                // One pin of this thread and workers that stay awake for the whole step: the GPU's
                // part of each layer leaves the pool idle for about as long as it spins.
                let _awake = pool.keep_awake();
                let _pin = pool.pin_caller();
                // SAFETY: the arrays are borrowed (numpy's borrow flags) for this call and checked above
                // for size, contiguity and dtype; only the GPU and this call touch them meanwhile.
                let mut mb = unsafe {
                    Mailbox::new(
                        staged as *const f32,
                        out as *mut f32,
                        flags as *const i64,
                        hidden,
                        k,
                        claims,
                    )
                };
                if let Some((at, n)) = hints {
                    // SAFETY: as above, for the hints array (checked to hold 1 + n values).
                    mb = unsafe { mb.with_hints(at as *const i64, n) };
                }
                if let Some((at, n, copies)) = prefetch {
                    // SAFETY: as above, for the predictions array (checked to be [2, 1 + n]).
                    mb = unsafe { mb.with_prefetch(at as *const i64, n) };
                    copies.begin()?;
                }
                serve_link(
                    &mb,
                    layers,
                    resident,
                    num_experts,
                    ids_out,
                    timeout,
                    |layer, x, ids, w| store.forward(&pool, path, layer, x, ids, w, act_int8),
                    |layer, ids, stop| store.read_ahead(&pool, layer, ids, stop),
                    |layer, parity, ids, seq| match prefetch {
                        Some((_, _, copies)) => copies.copy_layer(layer, parity, ids, seq),
                        None => {
                            Err("the step predicted experts, but no prefetch was set up".into())
                        }
                    },
                )
            })
            .map_err(PyRuntimeError::new_err)?;
        Ok((
            stats.cpu_pairs,
            stats.claimed_pairs,
            stats.cpu_seconds,
            stats.wait_seconds,
            stats.warmed,
            stats.warmed_used,
            stats.warmed_bytes,
            stats.prefetched,
            stats.prefetch_seconds,
        ))
    }
}

fn ids_2d(obj: &Bound<'_, PyAny>, m: usize, num_experts: usize) -> PyResult<(Vec<usize>, usize)> {
    if let Ok(a) = obj.cast::<PyArray2<i64>>() {
        let r = a.readonly();
        checked_ids(contiguous(&r, "expert_ids")?, r.shape(), m, num_experts)
    } else if let Ok(a) = obj.cast::<PyArray2<i32>>() {
        let r = a.readonly();
        checked_ids(contiguous(&r, "expert_ids")?, r.shape(), m, num_experts)
    } else {
        Err(PyTypeError::new_err(
            "expert_ids must be a 2-D numpy int64 or int32 array [M, k]",
        ))
    }
}

/// The ids of an [M, k] array (`shape`) as expert indices (-1: SKIP), with k, checked.
fn checked_ids<T: Copy + Into<i64>>(
    vals: &[T],
    shape: &[usize],
    m: usize,
    num_experts: usize,
) -> PyResult<(Vec<usize>, usize)> {
    if shape[0] != m || shape[1] == 0 {
        return Err(PyValueError::new_err(format!(
            "expert_ids must have shape [M={m}, k >= 1], got {shape:?}"
        )));
    }
    let mut ids = Vec::with_capacity(vals.len());
    for &v in vals {
        let v: i64 = v.into();
        ids.push(match v {
            -1 => SKIP,
            0.. if (v as usize) < num_experts => v as usize,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "expert id {v} out of range [0, {num_experts}) (-1 skips a pair)"
                )))
            }
        });
    }
    Ok((ids, shape[1]))
}

/// A store's routed-expert forward of `layer` into a new float32 array [M, H] (the `forward` of both
/// store classes): x float32 [M, H], expert_ids int [M, k] (-1 skips), weights float32 [M, k].
#[allow(clippy::too_many_arguments)]
fn routed_forward<'py, S: RoutedExperts + Sync>(
    py: Python<'py>,
    store: &S,
    num_layers: usize,
    layer: usize,
    x: &Bound<'py, PyAny>,
    expert_ids: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    act_int8: bool,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (h, _, num_experts) = store.sizes();
    let inp = MoeInputs::check(layer, (num_layers, num_experts), h, x, expert_ids, weights)?;
    let (xs, ws) = (contiguous(&inp.x, "x")?, contiguous(&inp.w, "weights")?);
    let (p, sp) = (pool::global(), path()?);
    let y = PyArray2::<f32>::zeros(py, [inp.m, h], false);
    // SAFETY: `y` was created just above, C-contiguous, and nothing else refers to its data
    // until it is returned.
    let out = unsafe { y.as_slice_mut() }.expect("a new array is contiguous");
    py.detach(|| store.forward_add(&p, sp, layer, xs, &inp.ids, ws, act_int8, out))
        .map_err(verr)?;
    Ok(y)
}

#[pymethods]
impl PyExpertStore {
    #[new]
    #[pyo3(signature = (num_layers, num_experts, hidden, intermediate, bits, group_size=128, numa="auto"))]
    fn new(
        num_layers: usize,
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        bits: u32,
        group_size: usize,
        numa: &str,
    ) -> PyResult<Self> {
        let policy = NumaPolicy::parse(numa).map_err(verr)?;
        let nodes = crate::topology::Topology::detect().num_nodes;
        let inner = ExpertStore::new(
            num_layers,
            num_experts,
            hidden,
            intermediate,
            bits,
            group_size,
            policy,
            nodes,
        )
        .map_err(verr)?;
        Ok(PyExpertStore { inner })
    }

    /// A store over finished cache files, one per MoE layer, memory-mapped (no parse, no copy).
    #[staticmethod]
    #[pyo3(signature = (paths, num_experts, hidden, intermediate, bits, group_size=128))]
    fn open(
        py: Python<'_>,
        paths: Vec<String>,
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        bits: u32,
        group_size: usize,
    ) -> PyResult<Self> {
        let paths: Vec<std::path::PathBuf> = paths.into_iter().map(Into::into).collect();
        let inner = py
            .detach(|| {
                ExpertStore::open_files(&paths, num_experts, hidden, intermediate, bits, group_size)
            })
            .map_err(verr)?;
        Ok(PyExpertStore { inner })
    }

    /// Quantise float gate [I, H], up [I, H], down [H, I] into place.
    fn set_expert(
        &mut self,
        py: Python<'_>,
        layer: usize,
        expert: usize,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (h, i) = (self.inner.layout.hidden, self.inner.layout.inter);
        let arrays = [
            FloatArray::extract(gate, None, "gate")?,
            FloatArray::extract(up, None, "up")?,
            FloatArray::extract(down, None, "down")?,
        ];
        for (a, (name, want)) in
            arrays
                .iter()
                .zip([("gate", (i, h)), ("up", (i, h)), ("down", (h, i))])
        {
            if a.shape() != want {
                return Err(PyValueError::new_err(format!(
                    "{name} must have shape {want:?}, got {:?}",
                    a.shape()
                )));
            }
        }
        let srcs = [
            arrays[0].src("gate")?,
            arrays[1].src("up")?,
            arrays[2].src("down")?,
        ];
        let p = pool::global();
        let store = &mut self.inner;
        py.detach(|| store.set_expert(&p, layer, expert, srcs))
            .map_err(verr)
    }

    /// Copy already-quantised parts (as `quantize` returns them) into place.
    #[allow(clippy::too_many_arguments)]
    fn set_expert_quantized(
        &mut self,
        layer: usize,
        expert: usize,
        gate_q: &Bound<'_, PyAny>,
        gate_s: &Bound<'_, PyAny>,
        up_q: &Bound<'_, PyAny>,
        up_s: &Bound<'_, PyAny>,
        down_q: &Bound<'_, PyAny>,
        down_s: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (gq, gs) = (bytes_of(gate_q, "gate_q")?, f32s_of(gate_s, "gate_s")?);
        let (uq, us) = (bytes_of(up_q, "up_q")?, f32s_of(up_s, "up_s")?);
        let (dq, ds) = (bytes_of(down_q, "down_q")?, f32s_of(down_s, "down_s")?);
        let parts = [
            (contiguous(&gq, "gate_q")?, contiguous(&gs, "gate_s")?),
            (contiguous(&uq, "up_q")?, contiguous(&us, "up_s")?),
            (contiguous(&dq, "down_q")?, contiguous(&ds, "down_s")?),
        ];
        self.inner
            .set_expert_quantized(layer, expert, parts)
            .map_err(verr)
    }

    /// Copy one expert's packed bytes (expert_nbytes long, as expert_view shows them) into place.
    fn set_expert_bytes(
        &mut self,
        layer: usize,
        expert: usize,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let d = bytes_of(data, "data")?;
        self.inner
            .set_expert_bytes(layer, expert, contiguous(&d, "data")?)
            .map_err(verr)
    }

    /// A read-only uint8 view (no copy) of one expert's packed bytes; it keeps the store alive.
    fn expert_view<'py>(
        slf: Bound<'py, Self>,
        layer: usize,
        expert: usize,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let arr = {
            let this = slf.borrow();
            let bytes = this.inner.expert_bytes(layer, expert).map_err(verr)?;
            let view = ArrayView1::from(bytes);
            // SAFETY: the bytes live in the store's mapping, which is never moved or unmapped while
            // the store object exists, and the array holds a reference to that object (container).
            unsafe { PyArray1::borrow_from_array(&view, slf.clone().into_any()) }
        };
        let kw = PyDict::new(slf.py());
        kw.set_item("write", false)?;
        arr.call_method("setflags", (), Some(&kw))?;
        Ok(arr)
    }

    /// Routed-expert forward of one layer: x float32 [M, H], expert_ids int [M, k], weights float32 [M, k].
    #[pyo3(signature = (layer, x, expert_ids, weights, act_int8=true))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        x: &Bound<'py, PyAny>,
        expert_ids: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        act_int8: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let s = &self.inner;
        routed_forward(py, s, s.num_layers, layer, x, expert_ids, weights, act_int8)
    }

    /// Answer one decode step's handshakes with a GPU step graph (see `decode_link`): for each MoE layer
    /// in `layers`, wait for the GPU to stage it in `staged` (x | weights | ids as float32), run the
    /// experts with `resident[layer, id] < 0` on the CPU, write their sum to `out` and raise `flags[1]`.
    /// Every routed id goes to `ids_out[j]`. With `claims` the staged row ends with one flag per pair,
    /// nonzero where the GPU computes it (1.0 prefetched, counted in claimed_pairs; 2.0 streamed), and the
    /// host skips those. With `hints` (int64
    /// [1 + n]: the handshake number, then up to n expert ids the GPU predicts for the next MoE layer),
    /// having answered a layer the host reads those experts ahead while the GPU runs the next attention.
    /// With `prefetch` (see `PrefetchSpec`; addresses of live buffers, as krasis.engine.prefetch builds
    /// them), having answered a layer the host queues copies of the GPU's predicted experts of the next.
    /// Returns (cpu_pairs, claimed_pairs, cpu_seconds, wait_seconds, hinted, hinted_used, bytes_read_ahead,
    /// prefetched, seconds queuing the prefetch's copies).
    #[pyo3(signature = (staged, out, flags, layers, resident, ids_out, timeout_s=30.0, act_int8=true, claims=false,
                        hints=None, prefetch=None))]
    #[allow(clippy::too_many_arguments)]
    fn serve_decode_graph(
        &self,
        py: Python<'_>,
        staged: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
        layers: Vec<usize>,
        resident: &Bound<'_, PyAny>,
        ids_out: &Bound<'_, PyAny>,
        timeout_s: f64,
        act_int8: bool,
        claims: bool,
        hints: Option<&Bound<'_, PyAny>>,
        prefetch: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<ServeResult> {
        let s = &self.inner;
        let dims = (s.num_layers, s.num_experts, s.layout.hidden);
        DecodeLinkArgs::check(
            staged, out, flags, resident, ids_out, hints, prefetch, &layers, dims, claims,
        )?
        .serve(py, s, &layers, (dims.1, dims.2), timeout_s, act_int8)
    }

    /// (address, nbytes) of each layer's buffer (layer order), for pinning / registering.
    fn buffers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.buffers())
    }

    /// Byte layout of one expert: offsets of gate, up, down blocks and their parts.
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let l = &self.inner.layout;
        let d = PyDict::new(py);
        d.set_item("expert_nbytes", l.nbytes)?;
        d.set_item("gate", layout_dict(py, &l.gate, l.gate_offset)?)?;
        d.set_item("up", layout_dict(py, &l.up, l.up_offset)?)?;
        d.set_item("down", layout_dict(py, &l.down, l.down_offset)?)?;
        Ok(d)
    }

    /// Read the weights of `experts` of `layer` into the CPU caches with the pool's workers (what the decode
    /// link does for hinted experts); returns the bytes read.
    fn read_ahead(&self, py: Python<'_>, layer: usize, experts: Vec<usize>) -> PyResult<usize> {
        let s = &self.inner;
        for &e in &experts {
            s.expert(layer, e).map_err(PyValueError::new_err)?;
        }
        let p = pool::global();
        Ok(py.detach(|| s.read_ahead(&p, layer, &experts, &|| false)))
    }

    #[getter]
    fn expert_nbytes(&self) -> usize {
        self.inner.layout.nbytes
    }
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers
    }
    #[getter]
    fn num_experts(&self) -> usize {
        self.inner.num_experts
    }
    #[getter]
    fn hidden(&self) -> usize {
        self.inner.layout.hidden
    }
    #[getter]
    fn intermediate(&self) -> usize {
        self.inner.layout.inter
    }
    #[getter]
    fn bits(&self) -> u32 {
        self.inner.layout.gate.bits
    }
    #[getter]
    fn group_size(&self) -> usize {
        self.inner.layout.gate.group
    }
    #[getter]
    fn numa(&self) -> &'static str {
        self.inner.policy.name()
    }
    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "ExpertStore(num_layers={}, num_experts={}, hidden={}, intermediate={}, bits={}, group_size={}, numa={:?})",
            s.num_layers, s.num_experts, s.layout.hidden, s.layout.inter, s.layout.gate.bits, s.layout.gate.group, s.policy.name()
        )
    }
}

/// Routed experts read in place from GGUF files (memory-mapped; blocks used as stored).
#[pyclass(name = "GgufExpertStore", module = "krasis._core")]
struct PyGgufExpertStore {
    inner: GgufExpertStore,
}

#[pymethods]
impl PyGgufExpertStore {
    /// `tensors[l]` = [(file index, data offset, ggml type id)] * 3 for gate, up, down of MoE
    /// layer l; each tensor is [num_experts, N, K] blocks at that offset of `paths[file index]`.
    #[new]
    fn new(
        py: Python<'_>,
        paths: Vec<String>,
        tensors: Vec<[(usize, usize, u32); 3]>,
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
    ) -> PyResult<Self> {
        let mut ts = Vec::with_capacity(tensors.len());
        for layer in tensors {
            let mut out = [GgufTensor {
                file: 0,
                offset: 0,
                ty: GgmlType::Q8_0,
            }; 3];
            for (o, (file, offset, id)) in out.iter_mut().zip(layer) {
                *o = GgufTensor {
                    file,
                    offset,
                    ty: GgmlType::from_id(id).map_err(verr)?,
                };
            }
            ts.push(out);
        }
        let paths: Vec<std::path::PathBuf> = paths.into_iter().map(Into::into).collect();
        let inner = py
            .detach(|| GgufExpertStore::open(&paths, ts, num_experts, hidden, intermediate))
            .map_err(verr)?;
        Ok(PyGgufExpertStore { inner })
    }

    /// Routed-expert forward of one layer: x float32 [M, H], expert_ids int [M, k] (-1 skips),
    /// weights float32 [M, k]. `act_int8`: activations quantised per token to INT8 (groups of 32)
    /// and integer dot products for the types that have them (all but Q2_K, Q3_K); False: f32.
    #[pyo3(signature = (layer, x, expert_ids, weights, act_int8=true))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        x: &Bound<'py, PyAny>,
        expert_ids: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        act_int8: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let s = &self.inner;
        routed_forward(py, s, s.num_layers, layer, x, expert_ids, weights, act_int8)
    }

    /// `ExpertStore.serve_decode_graph` for GGUF experts (`act_int8` as in `forward`).
    #[pyo3(signature = (staged, out, flags, layers, resident, ids_out, timeout_s=30.0, act_int8=true, claims=false,
                        hints=None, prefetch=None))]
    #[allow(clippy::too_many_arguments)]
    fn serve_decode_graph(
        &self,
        py: Python<'_>,
        staged: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
        layers: Vec<usize>,
        resident: &Bound<'_, PyAny>,
        ids_out: &Bound<'_, PyAny>,
        timeout_s: f64,
        act_int8: bool,
        claims: bool,
        hints: Option<&Bound<'_, PyAny>>,
        prefetch: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<ServeResult> {
        let s = &self.inner;
        let dims = (s.num_layers, s.num_experts, s.hidden);
        DecodeLinkArgs::check(
            staged, out, flags, resident, ids_out, hints, prefetch, &layers, dims, claims,
        )?
        .serve(py, s, &layers, (dims.1, dims.2), timeout_s, act_int8)
    }

    /// One expert's matrix dequantised to float32 (0 = gate [I, H], 1 = up, 2 = down [H, I]).
    fn dequantize_expert<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        expert: usize,
        which: usize,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let e = self.inner.expert(layer, expert).map_err(verr)?;
        let w = match which {
            0 => e.gate,
            1 => e.up,
            2 => e.down,
            _ => {
                return Err(PyValueError::new_err(
                    "which must be 0 (gate), 1 (up) or 2 (down)",
                ))
            }
        };
        let (n, k) = w.shape();
        to_2d(py, w.dequantize(), n, k)
    }

    /// The type names of gate, up, down per MoE layer.
    fn types(&self) -> Vec<[&'static str; 3]> {
        self.inner
            .tensors
            .iter()
            .map(|ts| ts.map(|t| t.ty.name()))
            .collect()
    }

    /// Bytes of one expert's gate + up + down in MoE layer `layer`, as stored.
    fn expert_nbytes(&self, layer: usize) -> PyResult<usize> {
        if layer >= self.inner.num_layers {
            return Err(PyValueError::new_err(format!("layer {layer} out of range")));
        }
        Ok(self.inner.expert_nbytes(layer))
    }
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers
    }
    #[getter]
    fn num_experts(&self) -> usize {
        self.inner.num_experts
    }
    #[getter]
    fn hidden(&self) -> usize {
        self.inner.hidden
    }
    #[getter]
    fn intermediate(&self) -> usize {
        self.inner.inter
    }
    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "GgufExpertStore(num_layers={}, num_experts={}, hidden={}, intermediate={})",
            s.num_layers, s.num_experts, s.hidden, s.inter
        )
    }
}

/// Seconds spent per step of ExpertStore.forward since the last call, and the call count:
/// ({"setup": s, "gate_up": s, "down": s, "total": s}, calls). For benchmarks.
#[pyfunction]
fn moe_phase_times<'py>(py: Python<'py>) -> PyResult<(Bound<'py, PyDict>, u64)> {
    let (t, calls) = crate::moe::take_phase_times();
    let d = PyDict::new(py);
    for (name, v) in ["setup", "gate_up", "down", "total"].iter().zip(t) {
        d.set_item(*name, v)?;
    }
    Ok((d, calls))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(simd_path, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_path, m)?)?;
    m.add_function(wrap_pyfunction!(supported_simd_paths, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_numa_nodes, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(matrix_layout, m)?)?;
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(pool_dispatch_overhead, m)?)?;
    m.add_function(wrap_pyfunction!(moe_phase_times, m)?)?;
    m.add_class::<PyQuantMatrix>()?;
    m.add_class::<PyExpertStore>()?;
    m.add_class::<PyGgufExpertStore>()?;
    m.add_function(wrap_pyfunction!(gguf_supported_types, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_matmul, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
